"""AdamW whose state lives in host memory and is paged onto the device in bounded chunks.

The update is torch's single-tensor AdamW step for step (decoupled weight decay, bias correction), in
float32. Parameters that are not float32 (BF16 adapters) get an FP32 master copy in the state; the
parameter receives the master rounded after every step, so small updates are never lost.

Paging (default for CUDA parameters): exp_avg, exp_avg_sq (and the master) sit in pinned host memory.
For the update a parameter is cut into chunks; each chunk's state is copied into one of two device
page buffers on a copy stream, updated on the compute stream, and copied back, so the copy of chunk
i+1 overlaps the update of chunk i. The two buffers together hold at most `page_bytes`: the device
never holds more optimizer state than that. On the CPU the same chunked code runs without streams
(`paged=True`), which is how CI tests it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with host-resident, device-paged state and FP32 master copies of non-FP32 parameters.

    Args:
        params: parameters or parameter groups (as any torch optimizer).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight decay decoupled).
        page_bytes: device memory for paged state (both double-buffered pages together).
        paged: None pages the state of CUDA parameters only; True/False forces it for all.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        page_bytes: int = 64 << 20,
        paged: bool | None = None,
    ) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if page_bytes < 4 * 3 * 2:
            raise ValueError(
                f"page_bytes must hold at least one element per buffer, got {page_bytes}"
            )
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )
        self.page_bytes, self.paged = int(page_bytes), paged
        self._pages: dict[tuple[torch.device, int], torch.Tensor] = {}

    def _is_paged(self, p: torch.Tensor) -> bool:
        return self.paged if self.paged is not None else p.device.type == "cuda"

    def _host_device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self._is_paged(p) else p.device

    def _new_state_tensor(
        self, p: torch.Tensor, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        host = self._host_device(p)
        pin = host.type == "cpu" and p.device.type == "cuda"
        t = torch.zeros(p.numel(), dtype=torch.float32, device=host, pin_memory=pin)
        if source is not None:
            t.copy_(source.detach().reshape(-1))
        return t

    def _init_state(self, p: torch.Tensor) -> dict:
        state = {
            "step": 0,
            "exp_avg": self._new_state_tensor(p),
            "exp_avg_sq": self._new_state_tensor(p),
        }
        if p.dtype != torch.float32:
            state["master"] = self._new_state_tensor(p, p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or not p.is_contiguous():
                    raise RuntimeError("PagedAdamW needs dense gradients and contiguous parameters")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                coeffs = _Coefficients.of(group, state["step"])
                if self._is_paged(p):
                    self._update_paged(p, state, coeffs)
                else:
                    _adamw(
                        p.view(-1),
                        p.grad.reshape(-1),
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        state.get("master"),
                        coeffs,
                    )
        return loss

    @torch.no_grad()
    def count_skipped_step(self) -> None:
        """Count a step whose update was skipped (a non-finite gradient) without changing any
        moment, so later bias corrections match those of a run resumed from a checkpoint."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1

    def _page_buffer(self, device: torch.device, n_state: int) -> torch.Tensor:
        """(2, n_state, page_elements) float32 on the device: the double-buffered page."""
        key = (device, n_state)
        if key not in self._pages:
            elements = max(1, self.page_bytes // (4 * n_state * 2))
            self._pages[key] = torch.empty(2, n_state, elements, dtype=torch.float32, device=device)
        return self._pages[key]

    def _update_paged(self, p: torch.Tensor, state: dict, coeffs: _Coefficients) -> None:
        host = [state[k] for k in _STATE_KEYS if k in state]  # (numel,) each, on the host
        pages = self._page_buffer(p.device, len(host))
        size = pages.shape[-1]
        chunks = [(s, min(s + size, p.numel())) for s in range(0, p.numel(), size)]
        streams = _Streams(p.device)
        flat, grad = p.view(-1), p.grad.reshape(-1)

        def load(i: int) -> None:
            s, e = chunks[i]
            with streams.copying():
                for buf, h in zip(pages[i % 2], host):
                    buf[: e - s].copy_(h[s:e], non_blocking=True)
            streams.loaded(i)

        load(0)
        for i, (s, e) in enumerate(chunks):
            if i + 1 < len(chunks):
                load(i + 1)  # overlaps the update below (same copy stream as the write-backs)
            streams.wait_loaded(i)
            views = [buf[: e - s] for buf in pages[i % 2]]
            master = views[2] if len(views) == 3 else None
            _adamw(flat[s:e], grad[s:e], views[0], views[1], master, coeffs)
            streams.computed(i)
            with streams.copying(after_compute=i):
                for buf, h in zip(views, host):
                    h[s:e].copy_(buf, non_blocking=True)
        streams.finish()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`; state stays float32 on the host (torch's loader would cast it to
        the parameter's dtype and device)."""
        groups, saved = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(sg["params"]) for g, sg in zip(self.param_groups, groups)
        ):
            raise ValueError("the state dict's parameter groups do not match this optimizer's")
        self.state.clear()
        for group, saved_group in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            for p, index in zip(group["params"], saved_group["params"]):
                if index not in saved:
                    continue
                entry = saved[index]
                state = {"step": int(entry["step"])}
                for key in _STATE_KEYS:
                    if key in entry:
                        state[key] = self._new_state_tensor(p, entry[key])
                self.state[p] = state


class _Coefficients:
    __slots__ = ("bc2_sqrt", "beta1", "beta2", "decay", "eps", "lr", "step_size")

    @classmethod
    def of(cls, group: dict, step: int) -> _Coefficients:
        c = cls()
        c.lr, (c.beta1, c.beta2), c.eps = group["lr"], group["betas"], group["eps"]
        c.decay = 1 - group["lr"] * group["weight_decay"]
        c.step_size = c.lr / (1 - c.beta1**step)
        c.bc2_sqrt = (1 - c.beta2**step) ** 0.5
        return c


def _adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    c: _Coefficients,
) -> None:
    """One AdamW step on flat views, in torch.optim.AdamW's order of operations (float32 state)."""
    weight = master if master is not None else param
    g = grad.float()
    weight.mul_(c.decay)
    exp_avg.lerp_(g, 1 - c.beta1)
    exp_avg_sq.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
    denom = (exp_avg_sq.sqrt() / c.bc2_sqrt).add_(c.eps)
    weight.addcdiv_(exp_avg, denom, value=-c.step_size)
    if master is not None:
        param.copy_(master)


class _Streams:
    """A copy stream and events on CUDA; no-ops elsewhere (copies are then synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)
            self.copy.wait_stream(self.compute)  # gradients and parameters are ready
            self.events: dict[tuple[str, int], torch.cuda.Event] = {}

    def _record(self, kind: str, i: int, stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self.events[(kind, i)] = event

    @contextlib.contextmanager
    def copying(self, after_compute: int | None = None):
        if not self.cuda:
            yield
            return
        if after_compute is not None:
            self.copy.wait_event(self.events[("computed", after_compute)])
        with torch.cuda.stream(self.copy):
            yield

    def loaded(self, i: int) -> None:
        if self.cuda:
            self._record("loaded", i, self.copy)

    def wait_loaded(self, i: int) -> None:
        if self.cuda:
            self.compute.wait_event(self.events[("loaded", i)])

    def computed(self, i: int) -> None:
        if self.cuda:
            self._record("computed", i, self.compute)

    def finish(self) -> None:
        if self.cuda:
            self.copy.synchronize()  # host state complete before anyone reads it
