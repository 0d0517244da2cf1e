"""The ``moecache`` command: a thin click layer over the Python API.

Bad input raises :class:`MoecacheError` anywhere below; the group turns it into one
line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path

import click

from moecache.policies import POLICIES, policy_table

from . import __version__
from .cli_options import (
    COUNT,
    SIZE,
    FiniteFloat,
    bandwidths_option,
    capacities_option,
    capacity_option,
    force_option,
    io_options,
    json_option,
    latency_option,
    memory_option,
    out_option,
    per_token_option,
    scope_option,
    seed_option,
    stream_option,
)
from .curve import curve
from .errors import MoecacheError
from .prefetchers import REGISTRY as PREFETCHERS
from .replay import replay
from .report import (
    comparison_table,
    curve_table,
    per_layer_table,
    result_summary,
    timeline_summary,
    trace_summary,
)
from .reroute import reroute
from .streaming import curve_stream, open_stream, replay_file, scan, should_stream, trace_header
from .synth import DEFAULT_EXPERT_BYTES, MAX_IDS, MAX_SKEW, write_synth
from .timeline import timeline
from .trace import Trace
from .trace_io import open_parquet_files, storage_stats
from .units import INT64_MAX, parse_int_list
from .validate import check_policy

POLICY_HELP = (f"Replacement policy, NAME or NAME:PARAM=VALUE,... ({', '.join(POLICIES)}), or a "
               "PythonPolicy in a file, FILE.py:CLASS[:PARAM=VALUE,...].")


class _Commands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoecacheError as err:
            click.echo(f"moecache: error: {err}", err=True)
            ctx.exit(2)
        except click.UsageError as err:
            command = f" {err.ctx.info_name}" if err.ctx and err.ctx.parent else ""
            click.echo(f"moecache: error: {err.format_message()} (see moecache{command} --help)",
                       err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("moecache: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moecache")
def cli() -> None:
    """Expert-cache simulation for Mixture-of-Experts models: capture, replay, compare."""


@cli.command()
@click.argument("trace", type=click.Path(dir_okay=True))
def info(trace: str) -> None:
    """Describe a trace: model, layers, experts, K, steps, tokens, size on disk. A trace too
    large for memory is read a block at a time, checked as when loaded."""
    if should_stream(trace):
        loaded, tokens = scan(trace)
    else:
        loaded, tokens = Trace.load(trace, weights=False, lookahead=False), None
    files, _, _ = open_parquet_files(trace)
    size, id_bytes = storage_stats(trace)
    click.echo(trace_summary(loaded, trace, size, id_bytes, files[0].schema_arrow.names, tokens))


@cli.command("replay")
@click.argument("trace", type=click.Path(dir_okay=True))
@click.option("--policy", "-p", default="lru", show_default=True, help=POLICY_HELP)
@capacity_option()
@memory_option
@scope_option
@io_options
@per_token_option
@stream_option
@seed_option()
@click.option("--per-layer", is_flag=True, help="Also print one row per MoE layer.")
@json_option("Print one JSON object instead of tables.")
def replay_command(trace: str, policy: str, capacity: int | None, memory: int | None, scope: str,
                   bandwidth: float | None, latency: float, per_token: bool, stream: bool | None, seed: int,
                   per_layer: bool, as_json: bool) -> None:
    """Simulate an expert cache over TRACE and report hit rate, reuse and miss I/O."""
    if capacity is None and memory is None:
        raise MoecacheError("give --capacity N (experts) or --memory SIZE (bytes)")
    if should_stream(trace, stream, policy):
        loaded = trace_header(trace)
        result = replay_file(trace, policy, capacity, scope, per_token=per_token, memory=memory,
                             bandwidth=bandwidth, latency=latency, seed=seed)
    else:
        loaded = Trace.load(trace, weights=_reads_scores(policy), lookahead=False)
        result = replay(loaded, policy, capacity, scope, memory=memory, bandwidth=bandwidth,
                        latency=latency, per_token=per_token, seed=seed)
    if as_json:
        out = result.to_dict()
        out["trace"] = trace
        if per_layer:
            out["per_layer"] = json.loads(result.per_layer.to_json(orient="records"))
        click.echo(json.dumps(out))
        return
    click.echo(result_summary(result, trace, loaded.partial))
    if per_layer:
        click.echo("")
        click.echo(per_layer_table(result))


@cli.command("curve")
@click.argument("trace", type=click.Path(dir_okay=True))
@click.option("--policy", "-p", default="lru", show_default=True, help=POLICY_HELP)
@scope_option
@capacities_option()
@io_options
@per_token_option
@stream_option
@seed_option()
@out_option("Write the table (.csv or .parquet).")
@force_option()
@json_option()
def curve_command(trace: str, policy: str, scope: str, capacities: str | None, bandwidth: float | None,
                  latency: float, per_token: bool, stream: bool | None, seed: int, out: str | None,
                  force: bool, as_json: bool) -> None:
    """Metrics at every capacity: one pass for lru, lfu and opt (streamed: one pass over
    the trace for all capacities)."""
    from .tables import write_table

    if should_stream(trace, stream):
        with open_stream(trace, per_token=per_token, weights=_reads_scores(policy)) as streamed:
            frame = curve_stream(streamed, policy, scope, capacities=capacities, bandwidth=bandwidth,
                                 latency=latency, seed=seed)
    else:
        frame = curve(Trace.load(trace, weights=_reads_scores(policy), lookahead=False), policy, scope,
                      capacities=capacities,
                      per_token=per_token, bandwidth=bandwidth, latency=latency, seed=seed)
    frame.insert(0, "trace", trace)
    if out:
        write_table(frame, out, overwrite=force)
    if as_json:
        click.echo(frame.to_json(orient="records"))
    elif not out:
        click.echo(f"{policy}, {scope} scope: {trace}")
        click.echo(curve_table(frame))
    else:
        click.echo(f"wrote {out}: {len(frame)} capacities")


@cli.command("capture")
@click.argument("model", type=click.Path())
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help="Text file (one prompt a line) or JSONL with a 'prompt' or 'text' field.")
@out_option("Trace to write (default: traces/<model>.parquet).")
@click.option("--mode", type=click.Choice(["generate", "forward"]), default="generate", show_default=True,
              help="generate: prefill step, then one step per new token; forward: teacher-forced, "
                   "one step per token of the text.")
@click.option("--max-new-tokens", type=COUNT, default=32, show_default=True)
@click.option("--batch-size", type=COUNT, default=1, show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True, help="Sampled or greedy decoding.")
@seed_option("Seed for sampled decoding.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16 or bfloat16.")
@click.option("--save-logits", is_flag=True, help="Also store full router scores (for rerouting).")
@click.option("--lookahead", is_flag=True, help="Also record the experts the next MoE layer's router "
              "picks from each MoE layer's input (for --prefetch lookahead-gate).")
@click.option("--router-label", help="Router name in the metadata [default: remoe for a folder from "
              "`remoe finetune`, else baseline].")
@click.option("--limit", type=COUNT, help="Use only the first N prompts.")
@click.option("--chat-template", is_flag=True, help="Wrap each prompt in the model's chat template.")
@force_option("Overwrite an existing trace.")
def capture_command(model: str, prompts: str, out: str | None, mode: str, max_new_tokens: int,
                    batch_size: int, sample: bool, seed: int, device: str, dtype: str,
                    save_logits: bool, lookahead: bool, router_label: str | None, limit: int | None,
                    chat_template: bool, force: bool) -> None:
    """Run a local Hugging Face MoE MODEL over prompts and record its routing as a trace.

    A MODEL file ending in .gguf runs in llama.cpp (the gguf extra) and records the
    experts llama.cpp selects; --batch-size, --dtype, --save-logits, --lookahead and
    --chat-template do not apply there.

    Ctrl-C or SIGTERM stops cleanly: the trace then holds every completed step and is
    marked partial.
    """
    from .capture import capture, default_out

    target = Path(out) if out else default_out(model, mode)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        written = capture(model, prompts, target, mode=mode, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, do_sample=sample, seed=seed, device=device,
                          dtype=dtype, save_logits=save_logits, lookahead=lookahead,
                          router_label=router_label,
                          limit=limit, chat_template=chat_template, overwrite=force)
    except KeyboardInterrupt:
        if target.exists():
            click.echo(f"moecache: interrupted; partial trace of every completed step in {target}",
                       err=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    trace = Trace.load(written, weights=False)
    click.echo(f"wrote {written}: {trace.num_tokens} tokens, {trace.num_steps} steps, "
               f"{trace.num_layers} MoE layers, E={trace.num_experts}, K={trace.top_k}")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@cli.group("remoe")
def remoe_group() -> None:
    """ReMoE: router-only fine-tuning for expert reuse."""


@remoe_group.command("finetune")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(),
              help="Training text: plain text (documents split by blank lines) or JSONL with 'text'.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Folder for the fine-tuned checkpoint.")
@click.option("--locality-weight", type=float, default=1.0, show_default=True,
              help="Weight of the temporal-locality term.")
@click.option("--window", type=int, default=1, show_default=True,
              help="Reward router mass on experts used in the previous W tokens.")
@click.option("--kl-weight", type=float, default=1.0, show_default=True,
              help="Weight of the KL anchor to the original model's outputs.")
@click.option("--lm-weight", type=float, default=1.0, show_default=True, help="Weight of next-token loss.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Training dtype.")
@seed_option("Seed of the data order and initialisation.")
@force_option("Replace an existing --out folder.")
def remoe_finetune_command(model: str, data: str, out: str, locality_weight: float, window: int,
                           kl_weight: float, lm_weight: float, steps: int, lr: float, seq_len: int,
                           batch_size: int, device: str, dtype: str, seed: int, force: bool) -> None:
    """Fine-tune only the routers of MODEL for expert reuse, anchored to the original outputs.

    Ctrl-C or SIGTERM stops training and saves what was trained (marked interrupted).
    """
    from .remoe import finetune

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = finetune(model, data, out, locality_weight=locality_weight, window=window,
                          kl_weight=kl_weight, lm_weight=lm_weight, steps=steps, lr=lr, seq_len=seq_len,
                          batch_size=batch_size, device=device, dtype=dtype, seed=seed, overwrite=force)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report.interrupted:  # saved, but not evaluated
        click.echo(f"moecache: interrupted; the routers trained in {report.steps} steps are saved "
                   f"in {out} (marked interrupted)", err=True)
        raise SystemExit(130)
    click.echo(f"wrote {out}: {report.steps} steps, reuse {100 * report.reuse_before:.2f}% -> "
               f"{100 * report.reuse_after:.2f}% on held-in text")


@cli.command("import")
@click.argument("source", type=click.Path())
@out_option("Trace to write.", required=True)
@click.option("--map", "mapping", help="Field=column pairs, e.g. experts=topk_ids,layer=layer,"
              "token=token_idx,seq=req_id (fields: experts, weights, layer, token, seq, pos, step, "
              "time, phase, token_id).")
@click.option("--num-experts", type=int, help="E (default: recorded by the log, else the largest id + 1, "
              "recorded as inferred).")
@click.option("--top-k", type=int, help="K, experts per token: needed by logs that do not record it "
              "(RTRACE01), checked against the others.")
@click.option("--layers", help="The model's MoE layer ids, e.g. 1:23 or 1,3,5 (rows of others are reported).")
@click.option("--model", help="Model name or path for the metadata.")
@click.option("--router-label", default="imported", show_default=True)
@click.option("--expert-bytes", type=SIZE,
              help="Bytes of one expert, e.g. 16MiB (for miss bytes and --memory).")
@click.option("--step", "step_mode", type=click.Choice(["column", "token", "prefill"]),
              help="Steps from a step column, one per token, or one per prefill run (default: the "
                   "step column if present, else one per token).")
@click.option("--order", type=click.Choice(["sequence", "token", "file"]),
              help="Row logs: each sequence's tokens together, sequences in order of first appearance "
                   "(sequence, the default); by token index across sequences (token); or by first "
                   "appearance in the file (file). A step or time column orders first.")
@click.option("--token-restarts", type=click.Choice(["none", "batch"]), default="none", show_default=True,
              help="batch: the token index restarts at every forward batch of a request (a new batch "
                   "begins where it does not increase; batches in file order).")
@click.option("--skip-warmup", type=int, default=0, show_default=True, help="Drop the first N tokens.")
@click.option("--drop-warmup", is_flag=True,
              help="Drop (and count) warm-up rows (null or negative ids, weights exactly 1/K, runs of "
                   "identical routing) instead of failing.")
@click.option("--drop-problems", is_flag=True,
              help="Drop (and count) incomplete, duplicate and conflicting rows instead of failing.")
@force_option()
def import_command(source: str, out: str, mapping: str | None, num_experts: int | None, top_k: int | None,
                   layers: str | None, model: str | None, router_label: str, expert_bytes: int | None,
                   step_mode: str | None, order: str | None, token_restarts: str, skip_warmup: int,
                   drop_warmup: bool, drop_problems: bool, force: bool) -> None:
    """Turn routing logs (JSONL, CSV, Parquet rows, .npy/.npz arrays, vLLM routed experts,
    RTRACE01) into a trace."""
    from .importer import import_routing

    report = import_routing(
        source, out, mapping=mapping, num_experts=num_experts, top_k=top_k, model=model,
        router_label=router_label, expert_bytes=expert_bytes,
        layers=None if layers is None else parse_int_list(layers, "layers"), step=step_mode, order=order,
        token_restarts=token_restarts, skip_warmup=skip_warmup,
        on_problem="drop" if drop_problems else "error", on_warmup="drop" if drop_warmup else "error",
        overwrite=force)
    click.echo(report.summary())


@cli.command("sweep")
@click.argument("traces", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--policies", default="lru,lfu,opt", show_default=True, help="Comma list of policies.")
@click.option("--scopes", default="layer", show_default=True, help="Comma list: layer, global.")
@capacities_option()
@out_option("Results table; written as .parquet and .csv side by side.", required=True)
@click.option("--resume", is_flag=True, help="Keep the finished cells of an existing --out.")
@force_option("Replace an existing --out.")
@io_options
@per_token_option
@seed_option()
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="Local threads, or a dask.distributed cluster.")
@click.option("--scheduler", help="Address of a running dask scheduler (default: a local cluster).")
@click.option("--workers", type=int, help="Parallel cells (default: all cores).")
def sweep_command(traces: tuple[str, ...], policies: str, scopes: str, capacities: str | None,
                  out: str, resume: bool, force: bool, bandwidth: float | None, latency: float,
                  per_token: bool, seed: int, executor: str, scheduler: str | None,
                  workers: int | None) -> None:
    """Replay TRACES under every policy, scope and capacity into one tidy table."""
    from .sweep import results_paths, sweep

    table = sweep(traces, _names(policies), _names(scopes), capacities, out=out,
                  resume=resume, overwrite=force, per_token=per_token, bandwidth=bandwidth,
                  latency=latency, seed=seed, executor=executor, scheduler=scheduler,
                  workers=workers)
    parquet, csv = results_paths(out)
    click.echo(f"wrote {parquet} and {csv}: {len(table)} rows")


def _reads_scores(policy: str) -> bool:
    """Whether ``policy`` reads the router weights (load them only then)."""
    return check_policy(policy).policy.needs_scores


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@cli.command("rank")
@click.argument("traces", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--policies", default=None,
              help="Comma list of policies (lru and opt are always added: the ends of the gap). "
              "Default: every registered policy the traces allow (score-lru needs router weights).")
@capacities_option(default="8:32:4")
@scope_option
@click.option("--train-fraction", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Share of each trace's sequences used for training only.")
@seed_option("Seed of the train/test split (and of the random policy).")
@per_token_option
@out_option("Folder for ranking.csv, table.csv and ranking.png.", required=True, folder=True)
@force_option("Overwrite the files in --out.")
def rank_command(traces: tuple[str, ...], policies: str | None, capacities: str, scope: str,
                 train_fraction: float, seed: int, per_token: bool, out: str, force: bool) -> None:
    """Rank policies by their share of the LRU-to-OPT gap on held-out sequences of TRACES."""
    from .ranking import rank, ranking_paths, write_ranking

    ranking_paths(out, overwrite=force)  # before the work
    frame, table = rank(traces, None if policies is None else _names(policies), capacities, scope,
                        train_fraction, seed, per_token)
    for path in write_ranking(frame, table, out, overwrite=force):
        click.echo(f"wrote {path}")
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


@cli.command("reroute")
@click.argument("trace", type=click.Path(dir_okay=True))
@out_option("Rerouted trace.", required=True)
@click.option("--mode", type=click.Choice(["recent", "cache"]), default="recent", show_default=True,
              help="Favour experts used in the last --window steps, or resident in an LRU cache.")
@click.option("--bias", type=FiniteFloat(), default=1.0, show_default=True, help="Added to favoured scores.")
@click.option("--window", type=COUNT, default=1, show_default=True, help="Steps of history (recent).")
@capacity_option("Cache size per layer (cache mode only).")
@click.option("--label", help="Router label of the new trace (default rerouted-MODE).")
@force_option()
def reroute_command(trace: str, out: str, mode: str, bias: float, window: int, capacity: int | None,
                    label: str | None, force: bool) -> None:
    """Emulate a reuse-biased router offline from the router scores saved in TRACE."""
    original = Trace.load(trace, logits=_has_logits(trace))
    rerouted, fidelity = reroute(original, mode=mode, bias=bias, window=window, capacity=capacity,
                                 label=label)
    before = replay(original, "lru", original.num_experts).reuse_rate
    after = replay(rerouted, "lru", rerouted.num_experts).reuse_rate
    rerouted.save(out, overwrite=force)
    click.echo(f"wrote {out} (router {rerouted.meta['router']}): reuse {100 * before:.2f}% -> "
               f"{100 * after:.2f}%, overlap with the original top-K {100 * fidelity.overlap:.2f}%, "
               f"gate mass kept {100 * fidelity.gate_mass:.2f}%")


def _has_logits(path: str) -> bool:
    files, _, _ = open_parquet_files(path)
    return "logits" in files[0].schema_arrow.names


@cli.command("plot")
@click.argument("results", type=click.Path(dir_okay=False))
@out_option("Folder for the figures.", required=True, folder=True)
@click.option("--traces", multiple=True, type=click.Path(dir_okay=True),
              help="Trace files for the reuse figures (default: the paths in the table).")
@click.option("--window", type=int, default=16, show_default=True, help="Largest window of reuse vs window.")
@click.option("--bootstrap", type=int, default=0, show_default=True,
              help="Confidence bands from N resamples of whole sequences (0: none).")
@seed_option("Seed of the bootstrap.")
@click.option("--format", "formats", multiple=True, default=("png", "pdf"), show_default=True)
@force_option("Replace the figures in --out (and remove stale ones).")
def plot_command(results: str, out: str, traces: tuple[str, ...], window: int, bootstrap: int, seed: int,
                 formats: tuple[str, ...], force: bool) -> None:
    """Figures from a sweep table: hit rate and bytes per token vs capacity, reuse vs window,
    per-layer reuse."""
    from .plots import plot_results

    written = plot_results(results, out, traces=list(traces) or None, bootstrap=bootstrap,
                           max_window=window, formats=formats, seed=seed, overwrite=force,
                           on_note=lambda note: click.echo(f"moecache: note: {note}", err=True))
    for path in written:
        click.echo(f"wrote {path}")


@cli.command("compare")
@click.argument("base", type=click.Path(dir_okay=True))
@click.argument("remoe", type=click.Path(dir_okay=True))
@capacities_option("--capacity", default="16,32")
@click.option("--policies", default="lru,lfu,opt", show_default=True)
@scope_option
@bandwidths_option
@latency_option
@click.option("--compute-ms", type=FiniteFloat(min=0, min_open=True),
              help="Non-expert compute per token in ms, for predicted TPOT with the traces' own expert "
              "sizes (or give --model).")
@click.option("--model", help="Model profile (name or TOML file) for expert sizes and compute: adds "
              "predicted TPOT, tokens/s and speedup rows.")
@click.option("--dtype", help="Stored type of the model profile's experts (bf16, q4_k, ...).")
@click.option("--hardware", default="jetson-orin-nx-16gb", show_default=True,
              help="Comma list of hardware profiles for the TPOT rows.")
@per_token_option
@stream_option
@out_option("Also write the table (.csv/.parquet).")
@force_option()
@json_option("Print JSON records.")
def compare_command(base: str, remoe: str, capacities: str, policies: str, scope: str, bandwidths: str,
                    latency: float, compute_ms: float | None, model: str | None, dtype: str | None,
                    hardware: str, per_token: bool, stream: bool | None, out: str | None, force: bool,
                    as_json: bool) -> None:
    """Baseline router against a ReMoE router: reuse, hit rates, bytes and I/O per token, and
    predicted decode time per hardware profile."""
    from .compare import compare
    from .tables import write_table

    with contextlib.ExitStack() as stack:
        if any(should_stream(path, stream) for path in (base, remoe)):
            traces = [stack.enter_context(open_stream(path, per_token=per_token)) for path in (base, remoe)]
        else:
            traces = [Trace.load(path, weights=False, lookahead=False) for path in (base, remoe)]
        frame = compare(*traces, capacities=capacities, policies=_names(policies), scope=scope,
                        bandwidths=_names(bandwidths), compute_ms=compute_ms, per_token=per_token,
                        latency=latency, hardware=_names(hardware), model=model, dtype=dtype)
    if out:
        write_table(frame, out, overwrite=force)
    click.echo(frame.to_json(orient="records") if as_json else comparison_table(frame))


@cli.command("policies")
def policies_command() -> None:
    """List the registered cache policies, their parameters and what they evict."""
    click.echo(policy_table())


@cli.command("timeline")
@click.argument("trace", type=click.Path(dir_okay=True))
@click.option("--hardware", required=True,
              help="Hardware profile name (moecache profiles) or a TOML file describing your own.")
@click.option("--policy", "-p", default="lru", show_default=True, help=POLICY_HELP)
@capacity_option()
@memory_option
@scope_option
@click.option("--model", help="Model profile (name or TOML file) for the expert sizes and the compute; "
              "default: the trace's expert bytes and dtype, with --dense-ms.")
@click.option("--dtype", help="Stored type of the model profile's experts (bf16, q8_0, q4_k, ...; "
              "default: the model's native type).")
@click.option("--dense-ms", type=FiniteFloat(), help="Non-expert compute per token in ms (instead of the "
              "model profile's figures).")
@click.option("--prefetch", type=click.Choice(list(PREFETCHERS)), help="Prefetcher (default: none).")
@click.option("--depth", type=COUNT, default=1, show_default=True, help="Prefetch lookahead in MoE layers.")
@click.option("--budget", type=COUNT, help="Experts per prefetch batch [default: top_k].")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="Overlap I/O with compute, or wait for every transfer.")
@click.option("--miss", type=click.Choice(["fetch", "host"]), default="fetch", show_default=True,
              help="Fetch a miss into fast memory, or compute it on the host CPU.")
@click.option("--tiers", is_flag=True, help="Misses look in the hardware's memory tiers in turn "
              "(each a cache of its capacity) instead of coming over its first link.")
@click.option("--tier-policy", default="lru", show_default=True, help="Policy of the lower tiers.")
@click.option("--train-fraction", type=FiniteFloat(), help="Split by sequence: prefetchers learn on this "
              "share, figures come from the rest [default for co-activation: 0.5].")
@seed_option()
@click.option("--per-layer", is_flag=True, help="Also print the stall per MoE layer.")
@click.option("--figure", type=click.Path(dir_okay=False), help="Also draw a Gantt chart of the first "
              "scored steps (.png, .pdf or .svg).")
@click.option("--figure-steps", type=COUNT, help="Steps the chart shows [default: 3].")
@click.option("--figure-from", type=click.IntRange(0),
              help="First step the chart shows, counted from the first scored step [default: 0].")
@force_option("Overwrite --figure if it exists.")
@json_option("Print one JSON object (tpot_s, tokens_per_s, stall_s, ...).")
def timeline_command(trace: str, hardware: str, policy: str, capacity: int | None, memory: int | None,
                     scope: str, model: str | None, dtype: str | None, dense_ms: float | None,
                     prefetch: str | None, depth: int, budget: int | None, overlap: bool, miss: str,
                     tiers: bool, tier_policy: str, train_fraction: float | None, seed: int,
                     per_layer: bool, figure: str | None, figure_steps: int | None,
                     figure_from: int | None, force: bool, as_json: bool) -> None:
    """Predict decode time (TPOT, tokens/s, stalls) of an expert cache over TRACE on a hardware
    profile: compute and I/O on one timeline, with prefetching and memory tiers."""
    if capacity is None and memory is None:
        raise MoecacheError("give --capacity N (experts) or --memory SIZE (bytes)")
    if figure is None and (figure_steps is not None or figure_from is not None or force):
        raise MoecacheError("--figure-steps, --figure-from and --force shape the chart: "
                            "give --figure FILE too")
    loaded = Trace.load(trace, weights=prefetch is not None or _reads_scores(policy),
                        lookahead=prefetch == "lookahead-gate")  # only the columns this run reads
    result = timeline(loaded, hardware, policy, capacity, scope, memory=memory, model=model,
                      dtype=dtype, dense_ms=dense_ms, prefetch=prefetch, depth=depth, budget=budget,
                      overlap=overlap, miss=miss, tiers=tiers, tier_policy=tier_policy,
                      train_fraction=train_fraction, seed=seed, record=figure is not None)
    if figure is not None:
        from .timeline_plot import timeline_figure  # matplotlib only when drawing

        scored = int(result.events["step"].max()) + 1 - result.steps  # the first test step
        for path in timeline_figure(result, figure, figure_steps or 3, scored + (figure_from or 0),
                                    overwrite=force):
            click.echo(f"wrote {path}", err=as_json)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "trace": trace}))
        return
    click.echo(timeline_summary(result, trace))
    if per_layer:
        click.echo("")
        click.echo(result.per_layer.to_string(index=False))


@cli.command("profiles")
@json_option("Print one JSON object with every figure and its source.")
def profiles_command(as_json: bool) -> None:
    """List the shipped hardware and model profiles with their key figures."""
    from .profiles import profiles_dict, profiles_table

    click.echo(json.dumps(profiles_dict()) if as_json else profiles_table())


@cli.command("synth")
@out_option("Trace to write.", required=True)
@click.option("--layers", type=click.IntRange(1, MAX_IDS), default=8, show_default=True, help="MoE layers.")
@click.option("--experts", type=click.IntRange(1, MAX_IDS), default=64, show_default=True,
              help="Routed experts per layer (E).")
@click.option("--top-k", type=click.IntRange(1, MAX_IDS), default=8, show_default=True,
              help="Experts per token (K).")
@click.option("--tokens", type=COUNT, default=4096, show_default=True, help="Tokens in all.")
@click.option("--sequences", type=COUNT, default=1, show_default=True,
              help="Sequences the tokens split into.")
@click.option("--prompt-len", type=click.IntRange(0, INT64_MAX), default=0, show_default=True,
              help="Leading tokens of each sequence served as one prefill step.")
@click.option("--stickiness", type=FiniteFloat(0, 1), default=0.5, show_default=True,
              help="Probability that each expert of the previous token is kept.")
@click.option("--skew", type=FiniteFloat(0, MAX_SKEW), default=0.8, show_default=True,
              help="Zipf exponent of expert popularity (0 = uniform).")
@seed_option("Seed of the draw.")
@click.option("--expert-bytes", type=SIZE, default=DEFAULT_EXPERT_BYTES, show_default=True,
              help="Bytes of one expert's weights (e.g. 16MiB), for miss bytes and memory budgets.")
@click.option("--logits", is_flag=True, help="Also write router scores and gate weights.")
@force_option("Overwrite an existing file.")
def synth_command(out: str, layers: int, experts: int, top_k: int, tokens: int, sequences: int,
                  prompt_len: int, stickiness: float, skew: float, seed: int, expert_bytes: int,
                  logits: bool, force: bool) -> None:
    """Write a synthetic sticky, skewed routing trace (labelled synthetic).

    The trace is generated and written block by block, in memory that does not grow with
    --tokens. Ctrl-C or SIGTERM stops cleanly: the file then holds every completed block
    and is marked partial.
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        write_synth(out, layers, experts, top_k, tokens, sequences=sequences, prompt_len=prompt_len,
                    stickiness=stickiness, skew=skew, seed=seed, expert_bytes=expert_bytes,
                    logits=logits, overwrite=force, progress=True)
    except KeyboardInterrupt:
        if Path(out).exists():
            click.echo(f"moecache: interrupted; partial trace of every completed block in {out}", err=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(f"wrote {out}: {tokens} tokens, {layers} layers, E={experts}, K={top_k}")


@cli.command("testbed")
@click.argument("trace", type=click.Path(dir_okay=True))
@click.option("--policy", "-p", default="lru", show_default=True, help=POLICY_HELP)
@capacity_option()
@scope_option
@click.option("--prefetch", type=click.Choice(list(PREFETCHERS)), help="Prefetcher (default: none).")
@click.option("--depth", type=COUNT, default=1, show_default=True, help="Prefetch lookahead in MoE layers.")
@click.option("--budget", type=COUNT, help="Experts per prefetch batch [default: top_k].")
@click.option("--expert-bytes", type=SIZE, help="Bytes of one expert in the file, rounded up to 4 KiB "
              "[default: the trace's, capped to keep the file within 256 MiB].")
@click.option("--compute-us", type=FiniteFloat(min=0), default=400.0, show_default=True,
              help="Busy-wait per expert computed (the emulated device).")
@click.option("--dense-us", type=FiniteFloat(min=0), default=200.0, show_default=True,
              help="Busy-wait per position (MoE layer of a step) for the non-expert work.")
@click.option("--queue-depth", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Reader threads (reads in flight).")
@click.option("--directory", type=click.Path(file_okay=False), help="Where the expert file goes (a local "
              "disk that takes O_DIRECT) [default: the current directory].")
@click.option("--calibrate/--link", "measure", default=True, show_default=True,
              help="Measure the disk's bandwidth and latency first, or use --bandwidth and --latency.")
@io_options
@click.option("--max-steps", type=COUNT, help="Replay only the first N steps.")
@seed_option()
@json_option("Print one JSON object (measured_tpot_s, predicted_tpot_s, relative_error, link, ...).")
def testbed_command(trace: str, policy: str, capacity: int | None, scope: str, prefetch: str | None,
                    depth: int, budget: int | None, expert_bytes: int | None, compute_us: float,
                    dense_us: float, queue_depth: int, directory: str | None, measure: bool,
                    bandwidth: float | None, latency: float, max_steps: int | None, seed: int,
                    as_json: bool) -> None:
    """Replay TRACE for real on this machine's disk (O_DIRECT reads, busy-wait compute) and
    print the measured TPOT beside the timeline's prediction (docs/testbed.md)."""
    from .profiles import Link
    from .testbed import testbed

    if capacity is None:
        raise MoecacheError("give --capacity N (experts)")
    if not measure and bandwidth is None:
        raise MoecacheError("--link needs --bandwidth (and --latency)")
    link = True if measure else Link(bandwidth, latency, queue_depth)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = testbed(Trace.load(trace), policy, capacity, scope=scope, prefetch=prefetch, depth=depth,
                         budget=budget, expert_bytes=expert_bytes, compute_us=compute_us, dense_us=dense_us,
                         queue_depth=queue_depth, directory=directory, calibrate=link, seed=seed,
                         max_steps=max_steps, progress=not as_json)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "trace": trace}))
        return
    click.echo(result.summary())

def main() -> None:
    """Console entry point."""
    sys.exit(cli.main(prog_name="moecache"))


if __name__ == "__main__":
    main()
