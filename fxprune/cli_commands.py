"""The command line's sub-commands, ``prune | export | verify | estimate | inspect``: each
``(args, log) -> exit code``, listed in :data:`COMMANDS` (``prune --stream`` is
``fxprune.cli_stream``, ``inspect`` is ``fxprune.cli_inspect``). ``fxprune.cli`` parses the
arguments and dispatches to them.

Every export records what the command knows in the file's hand-off metadata
(``fxprune.exporters.metadata``): the plan and what was removed, the equivalence proof, and for
``verify --export`` the latency measured; ``inspect FILE.onnx`` reads it back."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from fxprune.cli_inputs import (
    compile_source,
    export_options,
    flag_options,
    is_checkpoint,
    portable,
    timing_folder,
    unstructured_flags,
)
from fxprune.cli_inspect import inspect_command


class Log:
    """Progress lines on stderr: what runs now and how long the last step took."""

    def __init__(self, quiet: bool):
        self.quiet, self.t0, self.what = quiet, None, None

    def note(self, text: str) -> None:
        """One line of news on stderr (not a step: no timing)."""
        if not self.quiet:
            print(f"fxprune: {text}", file=sys.stderr, flush=True)

    def __call__(self, what: str | None) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if self.what is not None:
            print(f"  {self.what}: {now - self.t0:.1f} s", file=sys.stderr)
        if what is not None:
            print(f"fxprune: {what} ...", file=sys.stderr, flush=True)
        self.t0, self.what = now, what


@contextlib.contextmanager
def _writing(flag: str, path):
    """An OSError while writing ``path`` (a read-only folder, a missing one) is a one-line
    fxprune error naming the flag and the path."""
    from fxprune.errors import FileAccessError

    try:
        yield
    except OSError as e:
        raise FileAccessError(f"cannot write {flag} {path}: {e.strerror or e}") from e


def _print_recipe(a, log: Log) -> int:
    """``--print-recipe``: the recipe the flags build, as JSON on stdout; nothing is pruned."""
    import torch

    from fxprune.errors import ConfigError
    from fxprune.models import load_model
    from fxprune.options import from_options

    if is_checkpoint(a.model):
        raise ConfigError("--print-recipe builds a recipe from the flags; a checkpoint has a plan")
    log(f"building {a.model}")
    torch.manual_seed(a.seed)
    model, _ = load_model(a.model, trust=a.trust)
    structural = (
        a.heads or a.ffn or a.blocks or a.experts or unstructured_flags(a).get("unstructured")
    )
    channels = a.channels if a.channels is not None else (0.0 if structural else 0.5)
    recipe, _ = from_options(model, **flag_options(a, channels))
    log(None)
    print(recipe.to_json())
    return 0


def _prove(a, model, res, x, opened, log: Log):
    """(equivalence report, the checkpoint whose stored proof it is, else None): a checkpoint's
    stored proof when it proved this very model (``fxprune.stored_proof.recall``) and
    ``--reprove`` is not given, else the proof, run now (saying in one line why a stored one
    did not apply)."""
    import fxprune
    from fxprune.errors import ConfigError

    if opened is None and getattr(a, "reprove", False):
        raise ConfigError(
            "--reprove: there is no stored proof to set aside (the source is not a checkpoint "
            "and no --load CKPT is given); every run without one proves anyway"
        )
    if opened is not None and not getattr(a, "reprove", False):
        from fxprune.stored_proof import recall

        log(None)
        rep, why = recall(opened.ckpt, opened.path, opened.source, model, x, res)
        if rep is not None:
            log.note(
                f"reusing the equivalence proof stored in {opened.path} "
                f"(max_rel_err {rep.max_rel_err:.2e}; --reprove runs it again)"
            )
            return rep, opened.path
        log.note(f"{opened.path}: proving again: {why}")
    log("proving equivalence")
    return fxprune.verify.equivalence(model, res, x), None


def _checked(rep, reused) -> str:
    """The proof's line on stdout, saying where a reused one came from."""
    where = f" (the proof stored in {reused}, reused)" if reused else ""
    return f"equivalence check{where}: {rep}"


def _report(a, **sections) -> None:
    if getattr(a, "report", None):
        from fxprune.report import write

        with _writing("--report", a.report):
            path = write(a.report, f"fxprune {a.cmd}: {a.model}", command=_argv(), **sections)
        print(f"report: {path}", file=sys.stderr if a.json else sys.stdout)


def _argv() -> str:
    return "fxprune " + " ".join(sys.argv[1:])


def _routed(a, log: Log) -> int | None:
    """``prune --print-recipe`` and ``prune --stream`` (asked for, or chosen because the whole
    model would not fit), else None; flags that need another flag are refused by name."""
    from fxprune.cli_stream import should_stream, stream_command
    from fxprune.errors import ConfigError

    if getattr(a, "print_recipe", False):
        return _print_recipe(a, log)
    if getattr(a, "no_stream", False) and not (a.model.startswith("hf:") and a.save_pretrained):
        raise ConfigError(
            "--no-stream applies to hf:DIR with --save-pretrained, which would stream"
        )
    why = None if getattr(a, "stream", False) else should_stream(a)
    if why:
        print(f"fxprune: {why}", file=sys.stderr)
    if getattr(a, "stream", False) or why:
        if getattr(a, "overwrite", False):
            raise ConfigError("--overwrite: --stream writes only into a new or empty folder")
        return stream_command(a, log, _writing)
    if a.overwrite and not a.save_pretrained:
        raise ConfigError("--overwrite applies to --save-pretrained DIR, which is not given")
    if getattr(a, "compress", None) and not a.save:
        raise ConfigError(f"--compress {a.compress} needs --save FILE (what it compresses)")
    return None


def _prune(a, log: Log) -> int:
    from fxprune.passes import MaskCoverage

    routed = _routed(a, log)
    if routed is not None:
        return routed
    model, x, res, _ = compile_source(a, log)
    rep, _ = _prove(a, model, res, x, None, log)
    if a.save:
        from fxprune.stored_proof import record

        with _writing("--save", a.save):
            source = {"model": portable(a.model), "seed": a.seed}
            packed = {"compress": a.compress} if getattr(a, "compress", None) else {}
            proof = record(rep, source, model, x, res)  # export / verify reuse it
            sizes = res.save(a.save, source=source, proof=proof, **packed)
        if sizes:
            mb = {k: f"{v / 1e6:.1f} MB" for k, v in sizes.items()}
            log(f"--compress {a.compress}: masked weights {mb['dense']} -> {mb['stored']}")
    if a.save_pretrained:
        if not rep.ok:
            log(None)
            print(f"equivalence check: {rep}\nnot saved: the pruned model is not exact")
            return 1
        log(f"writing {a.save_pretrained}")
        with _writing("--save-pretrained", a.save_pretrained):
            res.save_pretrained(a.save_pretrained, overwrite=a.overwrite)
    exported = None
    if a.export:
        log(f"exporting {a.export}")
        with _writing("--export", a.export):
            exported = res.export(a.export, equivalence=rep)
    log(None)
    if a.json:
        print(
            json.dumps(
                {
                    "summary": res.summary.to_dict(),
                    "plan": res.plan.to_dict(),
                    "equivalence": vars(rep),
                    "barriers": res.barriers,
                    "masked": [r.coverage() for r in res.passes if isinstance(r, MaskCoverage)],
                    "seconds": res.seconds,
                    "export": str(exported.path) if exported else None,
                }
            )
        )
    else:
        print(f"{a.model}: traced with {res.plan.mode}, pruned in {res.seconds:.2f} s")
        print(res.report())
        print(f"\nequivalence check: {rep}")
        if a.save:
            print(f"saved plan + state_dict to {a.save}")
        if a.save_pretrained:
            print(
                f"saved a Hugging Face folder to {a.save_pretrained} (opens with "
                "transformers' from_pretrained, without fxprune)"
            )
        if exported:
            print(exported.table())
    _report(a, result=res, equivalence=rep)
    return 0 if rep.ok else 1


def _export(a, log: Log) -> int:
    options = export_options(a)  # a bad --format or option fails before any work
    model, x, res, opened = compile_source(a, log)
    rep, reused = _prove(a, model, res, x, opened, log)
    if not rep.ok:
        log(None)
        print(f"{_checked(rep, reused)}\nnot exported: the pruned model is not exact")
        return 1
    log(f"exporting {a.out}")
    with _writing("-o", a.out):
        out = res.export(a.out, equivalence=rep, **options)
    log(None)
    if a.json:
        doc = {"path": str(a.out), "equivalence": vars(rep), "export": _plain(out)}
        print(json.dumps({**doc, "proof_reused_from": reused}))
    else:
        print(_checked(rep, reused))
        print(out.table())
    return 0


def _plain(obj):
    """A JSON-able view of an exporter report."""
    from dataclasses import asdict, is_dataclass

    d = asdict(obj) if is_dataclass(obj) else dict(vars(obj))
    d.pop("log", None)
    return json.loads(json.dumps(d, default=str))


def _measure(a, model, res, x, workdir=None):
    """The verifier's side-by-side latency, with the timing flags every command shares."""
    import fxprune

    return fxprune.verify.latency(
        model,
        res,
        x,
        backend=getattr(a, "timing", None) or a.backend,  # --semi-structured, --precision
        workdir=workdir,
        batch_sizes=a.batch,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        warmup=a.warmup,
        repeats=a.repeats,
        threads=a.threads,
        progress=not a.quiet and sys.stderr.isatty(),
    )


def _verify(a, log: Log) -> int:
    import fxprune

    model, x, res, opened = compile_source(a, log)
    eq, reused = _prove(a, model, res, x, opened, log)
    log(f"measuring latency on {a.backend}")
    folder = timing_folder(a, model, res, x)  # the timed pruned.onnx, for --export to copy
    lat = _measure(a, model, res, x, folder and folder.name)
    est = None
    if a.report:
        log("estimating")
        est = fxprune.estimate(model, x, structured=res, batch_sizes=a.batch)
        profile = _profile_for(a.backend)
        if profile:
            est.compare(lat, hardware=profile)
    gates = []
    if not eq.ok:
        gates.append("the equivalence proof failed")
    if a.fail_if_slower and lat.slower():
        gates.append("the pruned model is slower at some batch size")
    if a.fail_if_noisy and lat.noisy:
        why = lat.noise or [n for r in lat.rows for n in r.noise]
        gates.append("the timing was noisy: " + "; ".join(why))
    if a.min_speedup is not None and lat.min_speedup() < a.min_speedup:
        gates.append(f"speedup {lat.min_speedup():.2f}x is below --min-speedup {a.min_speedup}")
    exported = None
    if a.export and not gates:  # the file lands only when every check passed
        log(f"exporting {a.export}")
        timed = Path(folder.name) / "pruned.onnx" if folder else None
        written = {"written": timed} if timed and timed.exists() else {}
        with _writing("--export", a.export):
            exported = res.export(a.export, equivalence=eq, latency=lat, **written)
    if folder:
        folder.cleanup()
    log(None)
    if a.json:
        out = json.loads(lat.to_json())
        out.update(equivalence=vars(eq), failed=gates, summary=res.summary.to_dict())
        out["proof_reused_from"] = reused
        out["export"] = str(exported.path) if exported else None
        print(json.dumps(out))
    else:
        print(
            f"{a.model}: MACs x{res.summary.macs_ratio:.3f}, params x{res.summary.params_ratio:.3f}"
        )
        print(lat.table())
        print(f"\n{_checked(eq, reused)}")
        for g in gates:
            print(f"FAILED: {g}")
        if exported:
            print(exported.table())
        elif a.export:
            print(f"not exported: {a.export} (a check failed)")
    _report(a, result=res, equivalence=eq, latency=lat, estimate=est)
    return 1 if gates else 0


def _profile_for(backend: str) -> str | None:
    """The estimator profile a measurement on ``backend`` compares with (None: no match)."""
    if backend == "onnxruntime-genai":
        return None  # a decode speedup: the estimate prices one forward of the example
    if backend not in ("tensorrt", "torch-cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((p for p in ("H100", "A100", "L4") if p in name), None)


def _estimate(a, log: Log) -> int:
    import fxprune

    model, x, res, _ = compile_source(a, log)
    log("estimating")
    est = fxprune.estimate(
        model,
        x,
        sparsity=None if a.unstructured <= 0 else a.unstructured,
        nm=None if a.nm == "none" else a.nm,
        structured=res,
        hardware=a.hardware,
        batch_sizes=a.batch,
        dtype=a.dtype,
        exclude=a.exclude,
    )
    lat = None
    if a.measure:
        log(f"measuring the structured model on {a.backend}")
        lat = _measure(a, model, res, x)
        profile = a.compare_with or _profile_for(a.backend)
        if profile:
            est.compare(lat, hardware=profile)
        else:
            print(
                "fxprune: no estimator profile matches this GPU (or decode timings): pass "
                "--compare-with",
                file=sys.stderr,
            )
    log(None)
    if a.json:
        out = est.to_dict()
        if lat is not None:
            out["latency"] = json.loads(lat.to_json())
        print(json.dumps(out))
    else:
        print(est.table(roofline_top=a.roofline_top))
        if lat is not None:
            print()
            print(lat.table())
    _report(a, result=res, latency=lat, estimate=est)
    return 0


COMMANDS = {
    "prune": _prune,
    "export": _export,
    "verify": _verify,
    "estimate": _estimate,
    "inspect": inspect_command,
}
