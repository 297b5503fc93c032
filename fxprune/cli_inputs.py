"""The command line's example inputs: the source's example reshaped by ``--input-shape``,
``--seq-len`` and ``--batch``."""

from __future__ import annotations


def fit(t, dim: int, n: int):
    """``t`` with ``n`` entries along ``dim``: its own repeated, or cut (ids stay ids, a mask a
    mask)."""
    from fxprune.errors import ConfigError

    if n < 1 or t.shape[dim] == 0:
        raise ConfigError(f"cannot make an example input of size {n} along dim {dim}")
    reps = [1] * t.ndim
    reps[dim] = -(-n // t.shape[dim])
    return t.repeat(*reps).narrow(dim, 0, n).contiguous()


def shaped(a, model, x):
    """The source's example input with ``--input-shape`` (every input of the first input's
    shape; a float input is drawn anew), ``--seq-len`` (dim 1 of integer 2-D inputs: token ids,
    masks) and ``--batch`` (dim 0 of every input) applied, in that order."""
    import torch

    from fxprune.errors import ConfigError

    shape, seq, batch = getattr(a, "input_shape", None), getattr(a, "seq_len", None), a.batch
    if isinstance(batch, list):  # verify / estimate: the first batch size timed, when given
        batch = batch[0] if getattr(a, "batch_given", False) else None
    if not (shape or seq or batch):
        return x
    single = isinstance(x, torch.Tensor)
    args = [x] if single else list(x)
    tensors = [i for i, t in enumerate(args) if isinstance(t, torch.Tensor) and t.ndim]
    if shape:
        first = args[tensors[0]].shape if tensors else None
        g = torch.Generator().manual_seed(a.seed)
        for i in (i for i in tensors if args[i].shape == first):
            t = args[i]
            if t.is_floating_point():
                args[i] = torch.randn(shape, generator=g, dtype=t.dtype)
            elif len(shape) == t.ndim:
                for d, n in enumerate(shape):
                    t = fit(t, d, n)
                args[i] = t
            else:
                raise ConfigError(
                    f"--input-shape {' '.join(map(str, shape))}: the example input is a "
                    f"{t.ndim}-D integer tensor (token ids): give {t.ndim} sizes, or use "
                    "--batch and --seq-len"
                )
    if seq:
        text = [i for i in tensors if args[i].ndim == 2 and not args[i].is_floating_point()]
        if not text:
            raise ConfigError(
                "--seq-len: the example has no token-id input (an integer (batch, sequence) "
                "tensor); use --input-shape"
            )
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and seq > limit:
            raise ConfigError(f"--seq-len {seq} exceeds max_position_embeddings ({limit})")
        for i in text:
            args[i] = fit(args[i], 1, seq)
    for i in tensors if batch else ():
        args[i] = fit(args[i], 0, batch)
    return args[0] if single else tuple(args)
