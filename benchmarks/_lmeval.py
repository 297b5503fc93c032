"""What benchmarks/llm_quality.py measures on every row, dense, fxprune's or the peer's, with the
same code: held-out perplexity per text, greedy tokens from a prompt, parameter counts, the
process's peak RSS, and the losses fxprune's data-driven criteria are given."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import _tinylm as tl

GIB_KIB = 1024 * 1024


# ---------------------------------------------------------------- memory


def rss_kib(field: str = "VmRSS") -> int:
    """A field of ``/proc/self/status`` in KiB: ``VmRSS`` (resident now), ``VmHWM`` (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where
    ``/proc/self/clear_refs`` cannot be written (the peak then covers the process's life)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fmt_peak(start_kib: int, peak_kib: int) -> str:
    """``"2.41 (+1.10)"``: the peak RSS in GiB and how far it rose above the RSS at the start."""
    if not peak_kib:
        return ""
    return f"{peak_kib / GIB_KIB:.2f} (+{max(peak_kib - start_kib, 0) / GIB_KIB:.2f})"


# ---------------------------------------------------------------- counts


def unique_params(module) -> list[torch.Tensor]:
    """The parameters, each storage once (a tied embedding and ``lm_head`` count once)."""
    seen, out = set(), []
    for _, p in module.named_parameters(remove_duplicate=False):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p)
    return out


def n_params(module) -> int:
    return sum(p.numel() for p in unique_params(module))


def n_nonzero(module) -> int:
    return sum(int((p != 0).sum()) for p in unique_params(module))


def nm_conforming(module, n: int = 2, m: int = 4, prefix: str = "model.layers.") -> float:
    """Fraction of M-groups along the input dim of the Linear weights under ``prefix`` that keep
    at most N nonzeros (1.0: every such weight is N:M sparse)."""
    ok = tot = 0
    for name, p in module.named_parameters():
        if name.startswith(prefix) and p.dim() == 2 and p.shape[1] % m == 0:
            g = (p.detach().reshape(-1, m) != 0).sum(1)
            ok, tot = ok + int((g <= n).sum()), tot + g.numel()
    return ok / tot if tot else float("nan")


# ---------------------------------------------------------------- quality


def perplexities(module, evals: dict[str, torch.Tensor], batch: int) -> dict[str, float]:
    """``{text: perplexity}`` over every predicted token of each text's held-out windows."""
    return {k: tl.perplexity(module, w, batch=batch) for k, w in evals.items()}


@torch.no_grad()
def greedy(module, prompt: torch.Tensor, tokens: int, stop: frozenset[int] = frozenset()):
    """The first ``tokens`` greedy tokens after ``prompt`` ``[1, n]`` (stops early at a token of
    ``stop``), by full forwards without a KV cache: the same loop for a Hugging Face model, a
    pruned GraphModule and the peer's model."""
    ids, out = prompt, []
    for _ in range(tokens):
        nxt = int(tl.logits_of(module(ids))[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], dim=1)
    return out


# ---------------------------------------------------------------- what the criteria are given


def causal_lm_loss(output, batch) -> torch.Tensor:
    """causal LM loss (next-token cross-entropy on the calibration window)"""
    ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits = tl.logits_of(output)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1)
    )


def learned_train_fn(calib: list[torch.Tensor], steps: int, lr: float):
    """``train_fn`` for ``importance="learned"``: ``steps`` Adam steps over the gates only, on
    the next-token loss of the calibration windows in turn (fxprune adds the L1 on the gates)."""

    def train_fn(gated) -> None:
        opt = torch.optim.Adam(gated.parameters(), lr=lr)
        for i in range(steps):
            x = calib[i % len(calib)]
            loss = causal_lm_loss(gated(x), (x,))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return train_fn
