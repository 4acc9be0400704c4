"""`edge-agent providers` and `edge-agent models list|pull|verify`: parsing and printing only;
the work is in hardware.py, catalog.py and inference/. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_agent.cli.common import Handler, load

EXIT_OK, EXIT_FAILED = 0, 1
PROVIDER_ORDER = ("cpu", "cuda", "NvTensorRtRtx", "openvino", "qnn", "dml")
# Distributions that carry ORT GenAI or ONNX Runtime; two of one module at once is a broken install.
PACKAGES = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml",
            "onnxruntime-genai-winml", "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
            "onnxruntime-qnn", "onnxruntime-directml", "onnxruntime-trt-rtx", "onnxruntime-ep-openvino",
            "onnxruntime-ep-nv-tensorrt-rtx")
SAME_MODULE = (("onnxruntime_genai", ("onnxruntime-genai", "onnxruntime-genai-cuda",
                                      "onnxruntime-genai-directml", "onnxruntime-genai-winml")),
               ("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
                                "onnxruntime-qnn", "onnxruntime-directml", "onnxruntime-trt-rtx")))
NEEDS_PACKAGE = {"cuda": "onnxruntime-genai-cuda", "NvTensorRtRtx": "onnxruntime-genai-cuda",
                 "dml": "onnxruntime-genai-directml"}
JETSON_HINT = "on a Jetson, see the README's Jetson section for a CUDA build of ORT GenAI"
VERIFY_PROMPT = "Write two sentences about the sea."


def add_parsers(commands: Any, config_help: str) -> None:
    """Register the subcommands on cli.py's subparsers (their handlers: HANDLERS)."""
    prov = commands.add_parser("providers", help="hardware, ORT GenAI packages, and which execution "
                               "provider loads the model (and why auto picks one)")
    prov.add_argument("--config", help=config_help)
    prov.add_argument("--model", help="model folder to try loading (default: model.path)")
    prov.add_argument("--json", action="store_true", help="print the report as JSON")

    models = commands.add_parser("models", help="model catalog: list, pull, verify")
    sub = models.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="catalog models, what is pulled, what fits this box")
    listing.add_argument("--config", help=config_help)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    pull = sub.add_parser("pull", help="download a catalog model's variant into state_dir/models "
                          "(needs: pip install 'edge-agent[hub]')")
    pull.add_argument("name", help="a name from `edge-agent models list`")
    pull.add_argument("--provider", choices=PROVIDER_ORDER,
                      help="variant for this provider (default: the box's best)")
    pull.add_argument("--variant", help="exact variant folder, e.g. cuda/cuda-fp16")
    pull.add_argument("--force", action="store_true", help="pull even if this box cannot run it")
    pull.add_argument("--config", help=config_help)
    verify = sub.add_parser("verify", help="load a model, generate, print tokens/s and the provider")
    verify.add_argument("path", nargs="?", help="model folder or catalog name (default: model.path)")
    verify.add_argument("--provider", choices=("auto", *PROVIDER_ORDER), help="override model.provider")
    verify.add_argument("--strict", action="store_true", help="no fallback: fail if the provider fails")
    verify.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    verify.add_argument("--config", help=config_help)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")


def _quiet_logs(settings: Any) -> None:
    from edge_agent import log

    log.configure("warning" if settings.log_level in ("debug", "info") else settings.log_level,
                  settings.log_format, sys.stderr)  # stdout is the report


# --- providers -------------------------------------------------------------------------------
def installed_packages() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def package_warnings(found: dict[str, str]) -> list[str]:
    warnings = []
    for module, dists in SAME_MODULE:
        both = [d for d in dists if d in found]
        if len(both) > 1:
            warnings.append(f"{', '.join(both)} all install the `{module}` module: the last installed "
                            f"wins; keep one (pip uninstall the others, then reinstall it)")
    return warnings


def providers_report(folder: Path | None, settings: Any) -> dict[str, Any]:
    from edge_agent.settings.catalog import resolve_model_path
    from edge_agent.hardware import detect
    from edge_agent.inference.types import read_genai_config
    from edge_agent.inference.child.providers import (INSTALL_HINTS, Attempt, Candidate, configured_providers,
                                                describe, plan, try_load)

    hw = detect()
    packages = installed_packages()
    report: dict[str, Any] = {
        "hardware": {**asdict(hw), "summary": hw.describe()}, "packages": packages,
        "package_warnings": package_warnings(packages),
        "configured": {"provider": settings.model.provider, "fallback": list(settings.model.fallback),
                       "provider_options": dict(settings.model.provider_options)},
        "model": None, "results": [], "auto": None,
    }
    try:
        folder = folder or resolve_model_path(settings)
        folder_providers = configured_providers(read_genai_config(folder))
    except Exception as exc:  # noqa: BLE001 - any reason the folder is unusable is reported as such
        report["model_error"] = str(exc)
        return report
    report["model"] = str(folder)
    report["folder_providers"] = folder_providers
    folder_choice = folder_providers[0] if folder_providers else "cpu"
    results: dict[str, Attempt] = {}
    for provider in PROVIDER_ORDER:
        model, attempt = try_load(folder, Candidate(provider, "test", "test", provider == folder_choice))
        del model  # free it before the next attempt
        results[provider] = attempt
        hint = INSTALL_HINTS.get(provider) if attempt.error else None
        if hint and provider in NEEDS_PACKAGE and NEEDS_PACKAGE[provider] in packages:
            hint = f"{NEEDS_PACKAGE[provider]} is installed: the error names the library or driver it lacks"
        elif hint and provider == "cuda" and hw.is_jetson:
            hint = JETSON_HINT
        report["results"].append({"provider": provider, "ok": attempt.error is None, "error": attempt.error,
                                  "ms": attempt.ms, "hint": hint})
    # What auto would do, replayed from the results above instead of loading again.
    candidates = plan("auto", settings.model.fallback, folder_providers, hw, settings.model.provider_options)
    replay: list[Attempt] = []
    for cand in candidates:
        seen = results.get(cand.provider)
        error = seen.error if seen else "not tested"
        replay.append(Attempt(cand.provider, cand.source, error, seen.ms if seen else 0.0))
        if error is None:
            break
    chosen = next((a.provider for a in replay if a.error is None), None)
    report["auto"] = {"provider": chosen, "reason": describe("auto", candidates, replay),
                      "tried": [c.provider for c in candidates]}
    report["batching"] = batching_report(folder, chosen, settings) if chosen else None
    return report


def servers_report(settings: Any) -> list[dict[str, Any]]:
    """The OpenAI-compatible servers the settings name, and whether each answers GET /models."""
    from edge_agent.errors import AgentError
    from edge_agent.inference.openai_client import OpenAIServer

    rows = []
    for role, remote in (("backend", settings.openai if settings.model.backend == "openai" else None),
                         ("overflow", settings.overflow if settings.overflow.base_url else None)):
        if remote is None:
            continue
        try:
            server = OpenAIServer(remote, role)
        except AgentError as exc:  # the API key file cannot be read
            rows.append({"role": role, "url": remote.base_url, "model": remote.model, "reachable": False,
                         "error": exc.message})
            continue
        try:
            rows.append({"role": role, "url": server.url, "model": server.name, **server.probe()})
        finally:
            server.close()
    return rows


def print_servers(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        state = f"answers (models: {', '.join(map(str, row.get('models') or [])) or 'none listed'})" \
            if row["reachable"] else f"does not answer: {row.get('error')}"
        print(f"{row['role'].capitalize()}: OpenAI-compatible server {row['url']}, model {row['model']!r}: {state}")


def batching_report(folder: Path, provider: str, settings: Any) -> dict[str, Any]:
    """How requests would share the model on that provider (one more load, with og.Engine)."""
    from edge_agent.errors import ModelLoadError
    from edge_agent.inference.child.engine import OrtGenaiEngine

    engine = OrtGenaiEngine(folder, provider, (), settings.model.provider_options,
                            batching=settings.inference.batching,
                            batch_max_length=settings.inference.batch_max_length)
    try:
        engine.load()
    except ModelLoadError as exc:
        return {"mode": "unknown", "reason": str(exc)}
    return {"mode": engine.batching.mode, "reason": engine.batching.reason, "group": engine.batching.group_size}


def print_providers(report: dict[str, Any]) -> None:
    print("Hardware:")
    for line in report["hardware"]["summary"]:
        print(f"  {line}")
    hw = report["hardware"]
    if not (hw["jetson_model"] or hw["l4t_release"] or hw["nvidia_gpus"] or hw["qualcomm_soc"]):
        print("  no NVIDIA GPU, Jetson or Qualcomm SoC found")
    print("ORT GenAI / ONNX Runtime packages:")
    for name, version in report["packages"].items():
        print(f"  {name} {version}")
    missing = [p for p in PACKAGES if p not in report["packages"]][:4]
    print(f"  (not installed: {', '.join(missing)}, ...)")
    for warning in report["package_warnings"]:
        print(f"  WARNING: {warning}")
    configured = report["configured"]
    print(f"Configured: provider = {configured['provider']!r}, fallback = {configured['fallback']}")
    if report["model"] is None:
        print(f"Load test: skipped, no usable model folder ({report.get('model_error')}); pass --model PATH")
        return
    print(f"Load test on {report['model']} (its genai_config.json asks for "
          f"{', '.join(report['folder_providers']) or 'cpu'}):")
    for row in report["results"]:
        status = f"ok ({row['ms']:.0f} ms)" if row["ok"] else f"failed: {row['error']}"
        print(f"  {row['provider']:<14}{status}")
        if row["hint"]:
            print(f"  {'':<14}to add it: {row['hint']}")
    auto = report["auto"]
    print(f"auto would use: {auto['provider'] or 'nothing (every candidate failed)'}")
    print(f"  why: {auto['reason']}")
    if report.get("batching"):
        print(f"Batching there: {report['batching']['mode']} ({report['batching']['reason']})")


def cmd_providers(args: argparse.Namespace) -> int:
    settings, _ = load(args.config)
    _quiet_logs(settings)
    report = providers_report(Path(args.model) if args.model else None, settings)
    report["servers"] = servers_report(settings)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_servers(report["servers"])
        print_providers(report)
    return EXIT_OK


# --- models ----------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from edge_agent.errors import CatalogError

    settings, _ = load(args.config)
    _quiet_logs(settings)
    handler = {"list": models_list, "pull": models_pull, "verify": models_verify}[args.models_command]
    try:
        return handler(args, settings)
    except CatalogError as exc:
        print(f"edge-agent models {args.models_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def models_list(args: argparse.Namespace, settings: Any) -> int:
    from edge_agent.settings.catalog import describe_entries, load_catalog
    from edge_agent.hardware import detect

    hw = detect()
    rows = describe_entries(list(load_catalog().values()), settings.state_dir, hw)
    if args.json:
        print(json.dumps({"state_dir": str(settings.state_dir), "hardware": hw.describe(), "models": rows},
                         indent=2))
        return EXIT_OK
    print(f"# this box: {'; '.join(hw.describe())}")
    print(f"# pulled models live in {settings.state_dir / 'models'}")
    for row in rows:
        print(f"{row['name']:<28} {row['kind']:<6} {row['context']:>6} tokens  {row['title']}")
        fits = row["fits"]
        if fits:
            print(f"    fits: {fits['provider']} {fits['folder']} "
                  f"({fits['size_gb']:g} GB download; {fits['why']})")
        elif row["variants"]:
            print("    fits: nothing this box can run (see `models pull NAME` for why; --force overrides)")
        for path in row["installed"]:
            print(f"    pulled: {path}")
        for path in row["partial"]:
            print(f"    incomplete: {path} (pull again to resume)")
        if not row["verified"] or not row["variants"]:
            print(f"    note: {row['note']}")
    return EXIT_OK


def models_pull(args: argparse.Namespace, settings: Any) -> int:
    from edge_agent.settings.catalog import choose_variant, get_entry, pull, variant_dir
    from edge_agent.hardware import detect

    entry = get_entry(args.name)
    if not entry.variants:
        print(f"edge-agent models pull: {entry.name} has nothing to pull: {entry.note}", file=sys.stderr)
        return EXIT_FAILED
    hw = detect()
    chosen, checks = choose_variant(entry, hw, args.provider, args.variant)
    if not checks:
        wanted = " ".join(x for x in (args.provider, args.variant) if x)
        print(f"edge-agent models pull: {entry.name} has no variant for {wanted} (have: "
              f"{'; '.join(v.label for v in entry.variants)})", file=sys.stderr)
        return EXIT_FAILED
    if chosen is None:
        if not args.force:
            print(f"edge-agent models pull: refusing: this box cannot run {entry.name}"
                  + (f" with {args.provider}" if args.provider else "") + ":", file=sys.stderr)
            for check in checks:
                print(f"  {check.variant.label}: {check.reason}", file=sys.stderr)
            print("  (--force pulls it anyway)", file=sys.stderr)
            return EXIT_FAILED
        chosen = checks[0]
        print(f"pulling despite: {chosen.reason} (--force)", file=sys.stderr)
    variant = chosen.variant
    target = variant_dir(settings.state_dir, entry.name, variant)
    print(f"pulling {variant.repo} {variant.folder} (~{variant.size_gb:g} GB) into {target}", file=sys.stderr)
    pull(entry, variant, settings.state_dir)
    print(target)
    print(f'done: set [model] path = "{entry.name}" (provider {chosen.provider})', file=sys.stderr)
    return EXIT_OK


def models_verify(args: argparse.Namespace, settings: Any) -> int:
    from edge_agent.settings.catalog import resolve_model_path
    from edge_agent.errors import ModelLoadError
    from edge_agent.inference import GenerationParams
    from edge_agent.inference.child.engine import OrtGenaiEngine

    model = settings.model
    if args.path:
        model = model.model_copy(update={"path": Path(args.path)})
    if args.provider:
        model = model.model_copy(update={"provider": args.provider})
    folder = resolve_model_path(settings.model_copy(update={"model": model}))
    try:
        engine = OrtGenaiEngine(folder, model.provider, () if args.strict else model.fallback,
                                model.provider_options)  # reads genai_config.json: may fail too
        started = time.monotonic()
        engine.load()
        load_ms = (time.monotonic() - started) * 1000
        engine.warm_up()
        result = engine.generate(({"role": "user", "content": VERIFY_PROMPT},),
                                 GenerationParams(max_new_tokens=max(2, args.tokens)))
    except ModelLoadError as exc:
        print(f"edge-agent models verify: {exc}", file=sys.stderr)
        return EXIT_FAILED
    out = {"model": str(folder), "provider": engine.provider, "reason": engine.provider_reason,
           "load_ms": round(load_ms, 1), "prompt_tokens": result.prompt_tokens,
           "tokens": result.completion_tokens, "ttft_ms": round(result.ttft_ms or 0.0, 1),
           "tokens_per_s": round(result.tokens_per_s, 1), "finish_reason": result.finish_reason,
           "text": result.text}
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(f"{folder}\n  provider: {engine.provider} ({engine.provider_reason})\n"
              f"  load {out['load_ms']:.0f} ms; {out['tokens']} tokens at {out['tokens_per_s']:.1f} tokens/s "
              f"(first after {out['ttft_ms']:.0f} ms)\n  text: {result.text[:200]!r}")
    return EXIT_OK


HANDLERS: dict[str, Handler] = {"providers": cmd_providers, "models": cmd_models}
