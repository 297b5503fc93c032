"""A hand-off record (``metadata.read_metadata``, ``genai.read_handoff``) as text for a
terminal: what ``fxprune inspect FILE.onnx`` / ``inspect DIR`` prints.

The record's types were checked when it was read (``exporters.record``); the values inside are
printed as they are, whatever they hold, so an edited record prints rather than crashes.
"""

from __future__ import annotations

from pathlib import Path


def describe(meta: dict, path: str | Path = "") -> str:
    """A decoded hand-off record as text (markdown tables); its failures come first."""
    name = f"{path}: " if path else ""
    if not meta:
        return (
            f"{name}no fxprune metadata (not exported by fxprune, or by a version before the "
            "hand-off metadata)"
        )
    lines = [f"{name}exported by fxprune {meta.get('version', '?')}"]
    lines += [f"check failed: {f}" for f in meta.get("failures", [])]
    lines += _digest_lines(meta)
    plan = meta.get("plan")
    if isinstance(plan, dict):
        shapes = "; ".join(
            "None" if i.get("none") else f"{i.get('shape')} {i.get('dtype')}"
            for i in plan.get("inputs", [])
        )
        passes = ", ".join(str(p.get("name", "?")) for p in plan.get("passes", [])) or "none"
        lines.append(f"plan: {plan.get('mode')} capture, passes: {passes}; inputs: {shapes}")
    io = meta.get("io")
    if io:
        for side in ("inputs", "outputs"):
            shown = "; ".join(
                f"{v.get('name')} {v.get('dtype')} {_shape(v.get('shape'))}"
                for v in io.get(side, [])
            )
            lines.append(f"{side}: {shown or '-'}")
    if meta.get("removed"):
        lines += ["", "| pass | removed |", "|---|---|"]
        lines += [f"| {k} | {_removed_line(e)} |" for k, e in meta["removed"].items()]
    if "plan" not in meta:
        lines.append("no plan: exported without a compile result")
    lines += _checks(meta)
    lines += _latency(meta.get("latency"))
    return "\n".join(lines)


def _digest_lines(meta: dict) -> list[str]:
    unverified = meta.get("unverified", {})
    lines = []
    if "plan_sha256" in meta and "plan" in meta:
        changed = "plan" in unverified.get("changed", [])
        status = "MISMATCH: the plan was changed" if changed else "matches the stored plan"
        lines.append(f"plan sha256 {str(meta['plan_sha256'])[:16]}...: {status}")
    if meta.get("digest_ok"):
        fields = len(meta.get("sha256", {}))
        lines.append(f"record: each of its {fields} fields matches its sha256")
    return lines


def _checks(meta: dict) -> list[str]:
    lines = []
    eq = meta.get("equivalence")
    if eq:
        where = f" in {eq['worst_output']}" if eq.get("worst_output") else ""
        lines += [
            "",
            f"equivalence: {'ok' if eq.get('ok') is True else 'FAILED'}, max rel err "
            f"{_num(eq.get('max_rel_err'))}{where} (tolerance {_num(eq.get('tolerance'))}), "
            f"{eq.get('dtype')}, {eq.get('inputs_checked')} inputs",
        ]
    au = meta.get("nm_audit")
    if au:
        lines.append(
            f"N:M audit ({au.get('n')}:{au.get('m')}): "
            f"{'ok' if au.get('ok') is True else 'FAILED'}, "
            f"{au.get('masked')} masked weights, {au.get('violations')} violations; "
            f"{au.get('nm_layers')}/{au.get('layers_checked')} weights checked keep the pattern"
        )
    g = meta.get("genai")
    if g:
        p = g.get("parity") or {}
        lines.append(
            f"genai: {g.get('precision')} on the {g.get('execution_provider')} execution "
            f"provider (onnxruntime-genai {g.get('onnxruntime_genai')}); greedy-token parity: "
            f"{'ok' if p.get('tokens_equal') is True else 'FAILED'}, {p.get('prompts')} "
            f"prompts x {p.get('new_tokens')} new tokens"
        )
    return lines


def _latency(lat) -> list[str]:
    if not lat:
        return []
    lines = [
        "",
        f"latency: {lat.get('backend')}, threads {lat.get('threads')}; {lat.get('machine')}"
        + (" (noisy: the machine was not quiet)" if lat.get("noisy") else ""),
        "| batch | dense ms | pruned ms | speedup |"
        if lat.get("mode") != "decode"
        else f"| batch | dense ms / step | pruned ms / step | decode speedup "
        f"({lat.get('prompt_len')} prompt + {lat.get('new_tokens')} new tokens) |",
        "|---|---|---|---|",
    ]
    return lines + [
        f"| {r.get('batch')} | {_num(r.get('dense_ms'), '.3f')} "
        f"| {_num(r.get('pruned_ms'), '.3f')} | {_num(r.get('speedup'), '.2f')}x |"
        for r in lat.get("batches", [])
    ]


def _removed_line(e: dict) -> str:
    if "units_before" in e:
        return f"{e.get('groups')} groups, {e['units_before']} -> {e.get('units_kept')} units"
    if "removed" in e:
        gone = e["removed"] if isinstance(e["removed"], list) else [e["removed"]]
        shown = ", ".join(str(b) for b in gone[:6]) + (" ..." if len(gone) > 6 else "")
        return f"{len(gone)} of {e.get('blocks_before', '?')} blocks: {shown or '-'}"
    if "n" in e and "m" in e:
        return f"{e['n']}:{e['m']} ({e.get('method', '?')}) on {e.get('layers', '?')} layers"
    return ", ".join(f"{k} {v}" for k, v in e.items())


def _shape(dims) -> str:
    if not isinstance(dims, list):
        return str(dims)
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _num(v, fmt: str = ".2e") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
