"""AdamW with float32 master weights and paged optimizer state (the same numbers as MLX's AdamW).

Paging: every trainable array is cut into pages of at most `page_elements` elements; a page holds its
float32 master copy and both moments. A step walks the pages one group at a time and evaluates each
group before the next, so the transient memory of an update is bounded by a few pages, not by the
whole state. Where the pages live (`placement`):
- "host" (default): numpy arrays, i.e. unified memory on a Mac that MLX's allocator and Metal's
  working set (its wired residency set) never hold; a page is copied in, updated and copied back.
- "device": mlx arrays, referenced by no graph except while they are updated (no copies).
Once the resident pages exceed `resident_budget_bytes`, the remaining pages are kept in a
memory-mapped file (the spill) and read in, updated and written back page by page. The arithmetic per
element is the same everywhere, so paged, spilled and unpaged runs agree exactly.

The masters are authoritative: `step` returns parameters rounded from them to each parameter's dtype
(bfloat16 adapters do not lose small updates to rounding).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ._mlx import mx

FORMAT_VERSION = 1
BYTES_PER_ELEMENT = 12  # float32 master + exp_avg + exp_avg_sq


@dataclass(frozen=True)
class PagedAdamWConfig:
    """AdamW (decoupled weight decay, torch's and MLX's formula) and its paging."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    bias_correction: bool = True  # torch's AdamW; MLX's AdamW needs bias_correction=True to match
    page_elements: int = 1 << 20
    placement: str = "host"  # resident pages: "host" (numpy) or "device" (mlx arrays)
    resident_budget_bytes: int | None = None  # None: every page resident; else spill the rest
    spill_dir: str | None = None  # folder for the spill file (a temporary file, deleted at exit)

    def __post_init__(self) -> None:
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.eps < 0 or self.weight_decay < 0:
            raise ValueError("eps and weight_decay must be >= 0")
        if self.page_elements <= 0:
            raise ValueError(f"page_elements must be positive, got {self.page_elements}")
        if self.placement not in ("host", "device"):
            raise ValueError(f"placement must be 'host' or 'device', got {self.placement!r}")
        if self.resident_budget_bytes is not None and self.resident_budget_bytes < 0:
            raise ValueError("resident_budget_bytes must be >= 0 or None")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@dataclass
class _Page:
    name: str
    start: int  # element range in the flattened parameter
    stop: int
    resident: list | None = None  # [master, exp_avg, exp_avg_sq] float32 (stop - start,), mx or np
    spill_offset: int | None = None  # element offset in the spill file

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class _Spill:
    path: Path
    array: np.memmap  # float32 (3, elements)
    _file: object = field(repr=False, default=None)


class PagedAdamW:
    """Paged AdamW over a tree of trainable arrays; call `init(params)`, then `step(grads, lr)`."""

    def __init__(self, config: PagedAdamWConfig | None = None) -> None:
        self.config = config or PagedAdamWConfig()
        self.step_count = 0
        self._pages: list[_Page] = []
        self._meta: dict[str, tuple[tuple[int, ...], mx.Dtype]] = {}
        self._spill: _Spill | None = None
        b1, b2 = self.config.betas
        eps, wd = self.config.eps, self.config.weight_decay

        def update(g, p, m, v, lr, c1, c2):  # one page, float32 (n,)
            p = p * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * mx.square(g)
            if self.config.bias_correction:
                return p - (c1 * m) / (mx.sqrt(v) * c2 + eps), m, v
            return p - lr * m / (mx.sqrt(v) + eps), m, v

        self._update = mx.compile(update)

    # -- layout ---------------------------------------------------------------------------------
    def init(self, params: dict) -> None:
        """Lay out pages for `params` (masters = the params in float32, moments zero)."""
        flat = tree_flatten(params)
        self._meta = {name: (tuple(a.shape), a.dtype) for name, a in flat}
        values = {name: a.astype(mx.float32).reshape(-1) for name, a in flat}
        self._layout({n: (values[n], None, None) for n in values})
        self.step_count = 0

    def _layout(self, values: dict[str, tuple]) -> None:
        """Cut (master, m, v) per name into pages; mx or numpy arrays, None moments meaning zeros."""
        budget = self.config.resident_budget_bytes
        resident_bytes, pages, spilled = 0, [], 0
        for name, (master, _m, _v) in values.items():
            n = master.size
            for start in range(0, n, self.config.page_elements):
                page = _Page(name, start, min(start + self.config.page_elements, n))
                if budget is None or resident_bytes + page.size * BYTES_PER_ELEMENT <= budget:
                    resident_bytes += page.size * BYTES_PER_ELEMENT
                    page.resident = [None, None, None]
                else:
                    page.spill_offset = spilled
                    spilled += page.size
                pages.append(page)
        self._pages = pages
        self._spill = self._open_spill(spilled) if spilled else None
        for page in pages:
            master, m, v = values[page.name]
            parts = [_slice(a, page) for a in (master, m, v)]
            self._store(page, parts)
        if self.config.placement == "device":
            mx.eval([p.resident for p in pages if p.resident is not None])

    def _open_spill(self, elements: int) -> _Spill:
        # kept open for the optimizer's lifetime; the file goes when the handle is collected
        handle = tempfile.NamedTemporaryFile(
            prefix="nf4-paged-adamw-",
            suffix=".f32",  # noqa: SIM115
            dir=self.config.spill_dir,
        )
        array = np.memmap(handle.name, dtype=np.float32, mode="w+", shape=(3, elements))
        return _Spill(Path(handle.name), array, handle)

    def _load(self, page: _Page) -> list[mx.array]:
        if page.resident is not None:
            if self.config.placement == "host":
                return [mx.array(a) for a in page.resident]
            return page.resident
        sl = slice(page.spill_offset, page.spill_offset + page.size)
        return [mx.array(self._spill.array[i, sl]) for i in range(3)]

    def _store(self, page: _Page, parts: list) -> None:
        if page.resident is not None:
            if self.config.placement == "host":
                page.resident = [np.array(p, dtype=np.float32) for p in parts]  # copies
            else:
                page.resident = [p if isinstance(p, mx.array) else mx.array(p) for p in parts]
            return
        sl = slice(page.spill_offset, page.spill_offset + page.size)
        for i, part in enumerate(parts):
            self._spill.array[i, sl] = np.asarray(part, dtype=np.float32)

    @property
    def resident_bytes(self) -> int:
        return sum(p.size for p in self._pages if p.resident is not None) * BYTES_PER_ELEMENT

    @property
    def spilled_bytes(self) -> int:
        return sum(p.size for p in self._pages if p.resident is None) * BYTES_PER_ELEMENT

    # -- the update -----------------------------------------------------------------------------
    def step(self, grads: dict, learning_rate: float) -> dict:
        """One AdamW step from `grads` (same tree as the params); returns the new params tree."""
        if not self._pages:
            raise RuntimeError("call init(params) before step()")
        flat_grads = dict(tree_flatten(grads))
        if set(flat_grads) != set(self._meta):
            raise KeyError(
                f"gradients do not match the parameters: "
                f"{sorted(set(flat_grads) ^ set(self._meta))[:5]}"
            )
        self.step_count += 1
        b1, b2 = self.config.betas
        t = float(self.step_count)
        lr = mx.array(learning_rate, dtype=mx.float32)
        c1 = lr / (1 - mx.power(mx.array(b1, mx.float32), t))
        c2 = mx.rsqrt(1 - mx.power(mx.array(b2, mx.float32), t))
        pieces: dict[str, list[mx.array]] = {name: [] for name in self._meta}
        pending, pending_size = [], 0
        for page in self._pages:
            g = flat_grads[page.name].reshape(-1)[page.start : page.stop].astype(mx.float32)
            master, m, v = self._update(g, *self._load(page), lr, c1, c2)
            if page.resident is None or self.config.placement == "host":
                mx.eval(master, m, v)
                self._store(page, [master, m, v])
            else:
                page.resident = [master, m, v]
                pending.append(page.resident)
                pending_size += page.size
            pieces[page.name].append(master)
            if pending_size >= self.config.page_elements:  # bounded transient memory
                mx.eval(pending)
                pending, pending_size = [], 0
        mx.eval(pending)
        return self._assemble(pieces)

    def _assemble(self, pieces: dict[str, list[mx.array]]) -> dict:
        out = []
        for name, (shape, dtype) in self._meta.items():
            parts = pieces[name]
            flat = parts[0] if len(parts) == 1 else mx.concatenate(parts)
            out.append((name, flat.reshape(shape).astype(dtype)))
        return tree_unflatten(out)

    def parameters(self) -> dict:
        """The current parameters, rounded from the masters to their dtypes."""
        return self._assemble(
            {n: [self._load(p)[0] for p in self._pages if p.name == n] for n in self._meta}
        )

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(tensors, metadata): per parameter `<name>.master`, `.exp_avg`, `.exp_avg_sq` (float32)."""
        tensors = {}
        for name, (shape, _) in self._meta.items():
            parts = [self._load(p) for p in self._pages if p.name == name]
            for i, key in enumerate(("master", "exp_avg", "exp_avg_sq")):
                tensors[f"{name}.{key}"] = np.concatenate([np.array(q[i]) for q in parts]).reshape(
                    shape
                )
        meta = {
            "format_version": str(FORMAT_VERSION),
            "step": str(self.step_count),
            "config": json.dumps(asdict(self.config)),
            "dtypes": json.dumps({n: str(d) for n, (_, d) in self._meta.items()}),
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        """Restore a `state_dict()`; `init(params)` must have run with the same parameter tree."""
        if int(metadata.get("format_version", -1)) != FORMAT_VERSION:
            raise ValueError(
                f"unsupported optimizer state version {metadata.get('format_version')}"
            )
        values = {}
        for name, (shape, _) in self._meta.items():
            arrays = []
            for key in ("master", "exp_avg", "exp_avg_sq"):
                a = tensors.get(f"{name}.{key}")
                if a is None or tuple(a.shape) != shape:
                    raise KeyError(
                        f"optimizer state for {name!r} is missing or has the wrong shape"
                    )
                arrays.append(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))
            values[name] = tuple(arrays)
        self._layout(values)
        self.step_count = int(metadata["step"])

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors, meta = self.state_dict()
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        self.load_state_dict(tensors, meta)


def _slice(a, page: _Page):
    if a is None:
        return mx.zeros((page.size,), dtype=mx.float32)
    return a[page.start : page.stop]
