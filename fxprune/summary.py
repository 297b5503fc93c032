"""The before / after table of a pruned model: parameters and MACs per layer and in total."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune._util import Report


def _num(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@dataclass
class LayerRow:
    layer: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclass
class Summary(Report):
    """Parameters and MACs before / after, per layer and in total."""

    layers: list[LayerRow]

    @classmethod
    def between(cls, before: dict, after: dict) -> Summary:
        """From two ``layer_stats`` tables (``{layer: {"params", "macs"}}``): a layer missing
        on one side (a removed block) counts 0 there."""
        zero = {"params": 0, "macs": 0}
        rows = []
        for layer in sorted(set(before) | set(after)):
            b, a = before.get(layer, zero), after.get(layer, zero)
            rows.append(LayerRow(layer, b["params"], a["params"], b["macs"], a["macs"]))
        return cls(rows)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(r.macs_before for r in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(r.macs_after for r in self.layers)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def table(self, top: int | None = 20) -> str:
        """A text table: the layers that changed most, then the totals."""
        rows = [
            r
            for r in self.layers
            if (r.params_before, r.macs_before) != (r.params_after, r.macs_after)
        ]
        rows.sort(key=lambda r: r.macs_before - r.macs_after, reverse=True)
        shown = rows[:top] if top else rows
        w = max([len(r.layer) for r in shown] + [5])
        lines = [f"{'layer':<{w}}  {'params':>21}  {'MACs':>25}"]
        for r in shown:
            lines.append(
                f"{r.layer:<{w}}  {_num(r.params_before):>9} -> {_num(r.params_after):>8}"
                f"  {_num(r.macs_before):>11} -> {_num(r.macs_after):>10}"
            )
        if top and len(rows) > top:
            lines.append(f"... {len(rows) - top} more layers changed")
        lines.append(
            f"{'total':<{w}}  {_num(self.params_before):>9} -> {_num(self.params_after):>8}"
            f"  {_num(self.macs_before):>11} -> {_num(self.macs_after):>10}"
        )
        lines.append(f"{'ratio':<{w}}  {self.params_ratio:>21.3f}  {self.macs_ratio:>25.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [vars(r) for r in self.layers],
        }
