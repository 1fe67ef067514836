"""The csr backend: a truly sparse `nn.Linear` whose weight is stored as CSR.

`CSRLinear` holds the live weights as one 1-D parameter `values` (length nnz) and the pattern
as index buffers (`crow`, `col`, rows sorted, columns sorted within a row). Forward and both
backward products cost O(nnz x batch):

    y  = W x          spmm with W
    dx = W^T g        spmm with W^T        (a transposed pattern, rebuilt when the topology changes)
    dW = g^T x        only at the live positions (SDDMM)

The products run in parallel numba kernels (dispatched by `sparse/kernels.py`), or in
torch.sparse (MKL spmm and `sampled_addmm`) where numba is missing.

Stock autograd through `F.linear(x, W_csr)` silently returns a *dense* weight gradient, which
an optimizer step would densify; the custom Function here never does. Optimizers see a normal
1-D parameter; rewiring carries their per-weight state across (kept connections keep it, new
ones start at zero). No tensor of the layer's full shape is ever made: the RigL growth signal
(the dense gradient) is computed a block of rows at a time.

Under `torch.autocast(..., dtype=torch.bfloat16)` a CSRLinear does what nn.Linear does: its
output (and so the activations it keeps for the backward pass and the gradients flowing back)
is bfloat16, while `values`, their gradient and the optimizer state stay float32. The numba
kernels read bfloat16 rows, sum in float32 and round each output element once; in very wide
layers, where reading activation rows sets the pace, that halves the traffic.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from neuroplast.sparse.kernels import CSRArrays, backend, backward_t, inverse_dtype, sddmm, spmm_t, transposed
from neuroplast.sparse.layer import CHUNK_ELEMENTS, Candidates, SparseLayer
from neuroplast.sparse.sampling import sample_positions

# torch warns once per process that CSR support is "beta"; the paths used here are tested.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def csr_pattern(flat: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow, col) of sorted flat indices."""
    row = flat // cols
    crow = torch.zeros(rows + 1, dtype=torch.long, device=flat.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=rows), 0)
    return crow, flat % cols


def _bias_grad(gt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gt.sum(1) in the bias's dtype: summed in float32 from bfloat16 gradients. The dtype is
    asked for only when it differs: in a 1M-neuron MLP, 20 float32 training steps peaked
    0.2-1.1 GB higher in memory with sum(1, dtype=torch.float32) than with sum(1)."""
    return gt.sum(1) if gt.dtype == dtype else gt.sum(1, dtype=dtype)


class _SparseLinearFunction(torch.autograd.Function):
    """y^T = W x^T + b with W = CSR(layer.pattern, values): takes x (batch, in), returns y^T
    (out, batch) in the activation dtype `dtype`. Activations are handled as (features, batch)
    so every product walks CSR rows over contiguous batch vectors; `CSRLinear.forward` returns
    the transposed view, which elementwise ops keep, so the next CSRLinear gets its x^T without
    a copy. With dtype bfloat16 (under `torch.autocast`), activations and their gradients are
    kept and read in bfloat16; values, their gradient and every sum stay float32."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        layer: CSRLinear,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        xt = transposed(x.to(dtype))
        ctx.x_batch_major = not x.t().is_contiguous()  # dx goes back in x's layout: no copy for autograd
        ctx.save_for_backward(xt, values)
        ctx.layer = layer
        ctx.version = layer.topology_version
        ctx.pattern, ctx.pattern_t = layer.pattern, layer.pattern_t
        ctx.has_bias = bias is not None
        with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen here, not by autocast
            return spmm_t(ctx.pattern, values, xt, layer.out_features, bias=bias, pattern_t=ctx.pattern_t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output_t: torch.Tensor):
        xt, values = ctx.saved_tensors
        layer: CSRLinear = ctx.layer
        if layer.topology_version != ctx.version:
            raise RuntimeError(
                "the topology of a CSRLinear changed between its forward and backward; rewire only "
                "after optimizer.step() (as DSTEngine.step does)"
            )
        gt = transposed(grad_output_t.t())  # free when the gradient arrives feature-major
        gt = gt.to(xt.dtype)  # a no-op unless autograd sent another dtype
        grad_x = grad_values = grad_bias = None
        bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:  # one pass for both (see backward_t)
            grad_xt, grad_values = backward_t(ctx.pattern, ctx.pattern_t, values, gt, xt)
            grad_bias = _bias_grad(gt, values.dtype) if bias_grad else None
        else:
            if ctx.needs_input_grad[0]:
                grad_xt = spmm_t(ctx.pattern_t, values, gt, layer.in_features)
            if ctx.needs_input_grad[1] and bias_grad:
                grad_values, grad_bias = sddmm(ctx.pattern, gt, xt, row_sums=True, dtype=values.dtype)
            elif ctx.needs_input_grad[1]:
                grad_values = sddmm(ctx.pattern, gt, xt, dtype=values.dtype)
            elif bias_grad:
                grad_bias = _bias_grad(gt, values.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = transposed(grad_xt) if ctx.x_batch_major else grad_xt.t()
        if layer.capture:  # RigL's growth signal; a layer used twice contributes both batches
            layer.captured.append((xt, gt))
        return grad_x, grad_values, grad_bias, None, None


class CSRLinear(nn.Module):
    """A truly sparse `nn.Linear`: y = x W^T + b with only the live weights of W stored, as CSR.

    `values` (a 1-D parameter, one entry per live weight) is what optimizers update; the
    pattern is held in the index buffers `crow` and `col` (rows sorted, columns sorted within a
    row), and `ever_active` records every position that has been live (ITOP's R_s). Forward and
    backward cost O(nnz x batch) and never build a tensor of the layer's full shape, so a layer
    can be far wider than memory would hold densely; the weight gradient exists only at the
    live positions. Works under `torch.autocast` (bfloat16 activations, float32 values).

    Made by `sparsify(model, ..., backend="csr")` from a model's `nn.Linear` layers, by
    `CSRLinear.from_linear`, or directly with `CSRLinear.random(in_features, out_features, nnz)`
    (then `Topology.of_csr_layers(model)` gives the DST engine its view). `state_dict()` holds
    values, bias, crow, col and ever_active; loading one takes the saved number of live weights.

    Args:
        in_features: the input size of the dense layer this one stands for.
        out_features: its output size.
        flat: sorted, distinct flat indices (row * in_features + col) of the live weights.
        values: their weights, in the order of `flat`.
        bias: the bias (out_features), or None for none.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        flat: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if flat.numel() != values.numel():
            raise ValueError(f"{flat.numel()} positions but {values.numel()} values")
        if flat.numel() and (
            bool((flat.diff() <= 0).any()) or int(flat[0]) < 0 or int(flat[-1]) >= in_features * out_features
        ):
            raise ValueError("positions must be sorted, distinct flat indices inside the weight's shape")
        self.topology_version = 0  # bumped by every change of the pattern
        self.values = nn.Parameter(values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        crow, col = csr_pattern(flat, out_features, in_features)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("ever_active", flat.clone())  # sorted flat indices ever live (R_s)
        # W^T's pattern and the permutation values -> W^T values: derived, not saved.
        self.register_buffer("crow_t", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("col_t", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("perm_t", torch.empty(0, dtype=torch.long), persistent=False)
        self._build_transpose()
        self.capture = False
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def from_linear(cls, linear: nn.Linear, flat: torch.Tensor) -> CSRLinear:
        """The live positions `flat` (sorted flat indices) of `linear`, as a CSR layer."""
        values = linear.weight.detach().reshape(-1)[flat]
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, flat, values, bias).to(linear.weight.device)

    @classmethod
    def random(
        cls, in_features: int, out_features: int, nnz: int, generator: torch.Generator | None = None, bias: bool = True
    ) -> CSRLinear:
        """A layer with `nnz` uniformly placed live weights, built without any tensor of the full
        shape (so it can be far larger than memory would allow densely). Values are nn.Linear's
        default init scaled to each unit's live fan-in, as `sparsify(rescale_init=True)` does."""
        flat = sample_positions(in_features * out_features, nnz, generator)
        live_fan_in = torch.bincount(flat // in_features, minlength=out_features).clamp_min(1)
        bound = (1.0 / live_fan_in.float().sqrt())[flat // in_features]
        values = (torch.rand(nnz, generator=generator) * 2 - 1) * bound
        bias_values = None
        if bias:
            bias_values = (torch.rand(out_features, generator=generator) * 2 - 1) / in_features**0.5
        return cls(in_features, out_features, flat, values, bias_values)

    def _rows(self) -> torch.Tensor:
        """The row of every live weight, in storage order."""
        return torch.repeat_interleave(torch.arange(self.out_features, device=self.col.device), self.crow.diff())

    def _build_transpose(self) -> None:
        row = self._rows()
        self.perm_t = torch.argsort(self.col * self.out_features + row)
        self.col_t = row[self.perm_t]
        self.crow_t = torch.zeros(self.in_features + 1, dtype=torch.long, device=self.col.device)
        self.crow_t[1:] = torch.cumsum(torch.bincount(self.col, minlength=self.in_features), 0)

    @property
    def pattern(self) -> CSRArrays:
        """W's pattern for the kernels; rebuilt whenever the index buffers are replaced
        (a rewiring, a state_dict load, a move to another device)."""
        if (
            getattr(self, "_pattern", None) is None
            or self._pattern.crow is not self.crow
            or self._pattern.col is not self.col
        ):
            self._pattern = CSRArrays(self.crow, self.col)
        return self._pattern

    @property
    def pattern_t(self) -> CSRArrays:
        """W^T's pattern and the permutation from W's values to W^T's."""
        cached = getattr(self, "_pattern_t", None)
        if (
            cached is None
            or cached.crow is not self.crow_t
            or cached.col is not self.col_t
            or cached.perm is not self.perm_t
        ):
            self._pattern_t = CSRArrays(self.crow_t, self.col_t, self.perm_t)
        return self._pattern_t

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def flat_index(self) -> torch.Tensor:
        """Sorted flat indices of the live weights; computed once per pattern (a topology update
        asks for them three times: live values, candidates, rewiring)."""
        cached = getattr(self, "_flat", None)
        if cached is None or cached[0] is not self.col:
            self._flat = (self.col, self._rows() * self.in_features + self.col)
        return self._flat[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b over the last dimension of x, computed from the live weights only."""
        flat_x = x.reshape(-1, self.in_features)
        y = _SparseLinearFunction.apply(flat_x, self.values, self.bias, self, self.activation_dtype(x)).t()
        return y.reshape(*x.shape[:-1], self.out_features)

    def activation_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype this layer computes its output in, as nn.Linear would: autocast's (e.g.
        bfloat16 under `torch.autocast("cpu", dtype=torch.bfloat16)`) when it is on for x's
        device, else x's own. Values and their gradient keep their dtype either way."""
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def to_dense(self) -> torch.Tensor:
        """The full weight matrix (for inspection and tests only: it is the size of a dense layer)."""
        dense = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        dense[self.flat_index()] = self.values.detach()
        return dense.view(self.out_features, self.in_features)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the weight: values, the CSR indices, the transposed pattern (with the
        inverse permutation that the numba backward pass builds, int32 below 2^31 weights)."""
        nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        inverse = self.nnz * inverse_dtype(self.nnz).itemsize if backend() == "numba" else 0
        return {
            "values": nbytes(self.values),
            "indices": nbytes(self.crow, self.col),
            "transpose": nbytes(self.crow_t, self.col_t, self.perm_t) + inverse,
            "dense_equivalent": self.out_features * self.in_features * self.values.element_size(),
        }

    @torch.no_grad()
    def set_pattern(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the live positions (sorted flat indices) and their values, in place: the
        `values` parameter object stays the same, so optimizers keep pointing at it."""
        self.values.data = values
        self.values.grad = None
        self.crow, self.col = csr_pattern(flat, self.out_features, self.in_features)
        self._build_transpose()
        self.topology_version += 1

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nnz and the ever-active set differ between topologies: take the saved sizes, after
        # checking that the saved pattern fits this layer (the kernels do not bounds-check).
        crow, col, values = (state_dict.get(prefix + k) for k in ("crow", "col", "values"))
        if crow is not None and col is not None and values is not None:
            problem = None
            if crow.numel() != self.out_features + 1:
                problem = f"crow has {crow.numel()} entries, this layer has {self.out_features} rows"
            elif (
                int(crow[0]) != 0
                or int(crow[-1]) != col.numel()
                or col.numel() != values.numel()
                or bool((crow.diff() < 0).any())
            ):
                problem = "crow, col and values do not form a CSR pattern"
            elif col.numel() and (int(col.min()) < 0 or int(col.max()) >= self.in_features):
                problem = f"column indices outside [0, {self.in_features})"
            if problem:
                error_msgs.append(f"size mismatch for {prefix}values/crow/col: {problem}")
                return
            for name in ("values", "crow", "col", "ever_active"):
                saved = state_dict.get(prefix + name)
                if saved is None:
                    continue
                current = getattr(self, name)
                if name == "values":
                    self.values.data = torch.empty_like(saved, device=current.device)
                    self.values.grad = None
                else:
                    setattr(self, name, torch.empty_like(saved, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._build_transpose()
        self.topology_version += 1

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, density={density:.4f}"
        )


def sorted_contains(sorted_values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Membership of `query` in the sorted 1-D tensor `sorted_values`."""
    if sorted_values.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool)
    position = torch.searchsorted(sorted_values, query).clamp_max(sorted_values.numel() - 1)
    return sorted_values[position] == query


class CSRLayer(SparseLayer):
    """The DST engine's view of a `CSRLinear`."""

    truly_sparse = True

    def __init__(self, name: str, module: CSRLinear):
        self.name = name
        self.module = module

    @property
    def capture(self) -> bool:
        return self.module.capture

    @capture.setter
    def capture(self, value: bool) -> None:
        self.module.capture = value

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.module.out_features, self.module.in_features)

    @property
    def nnz(self) -> int:
        return self.module.nnz

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.values.detach(), self.module.flat_index()

    def live_grad(self) -> torch.Tensor | None:
        grad = self.module.values.grad
        return None if grad is None else grad.detach()

    @torch.no_grad()
    def neuron_magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
        module = self.module
        w = module.values.detach().abs()
        rows = module.flat_index() // module.in_features
        per_out = torch.zeros(module.out_features, dtype=w.dtype, device=w.device).index_add_(0, rows, w)
        per_in = torch.zeros(module.in_features, dtype=w.dtype, device=w.device).index_add_(0, module.col, w)
        return per_out, per_in

    def candidates(self, dropped: torch.Tensor) -> Candidates:
        flat = self.module.flat_index()
        live = flat[~sorted_contains(dropped.sort().values.to(flat.device), flat)]

        def contains(query: torch.Tensor) -> torch.Tensor:
            query = query.to(live.device)
            n = query.numel()
            if (
                n > 1024
                and int(query[-1]) - int(query[0]) == n - 1
                and torch.equal(query, query[0] + torch.arange(n, device=live.device))
            ):
                # a block of consecutive positions (how growth scores arrive): mark the live ones
                first = int(query[0])
                lo, hi = torch.searchsorted(live, torch.tensor([first, first + n], device=live.device)).tolist()
                empty = torch.ones(n, dtype=torch.bool, device=live.device)
                empty[live[lo:hi] - first] = False
                return empty
            return ~sorted_contains(live, query)

        return Candidates(size=self.size, count=self.size - live.numel(), contains=contains)

    def dense_grad_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.module.captured:
            raise RuntimeError(f"layer {self.name}: no gradient was captured for this update")
        pairs = self.module.captured  # (in, batch), (out, batch) per backward of this layer
        xt = torch.cat([x for x, _ in pairs], dim=1) if len(pairs) > 1 else pairs[0][0]
        gt = torch.cat([g for _, g in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
        dtype = self.module.values.dtype  # bfloat16 activations (autocast) are widened to it
        xt = xt.to(dtype)
        n_in = self.module.in_features
        rows = max(1, CHUNK_ELEMENTS // n_in)
        for start in range(0, self.module.out_features, rows):
            stop = min(start + rows, self.module.out_features)
            block = gt[start:stop].to(dtype) @ xt.t()  # (rows, in): the dense gradient of those rows
            yield torch.arange(start * n_in, stop * n_in, device=xt.device), block.reshape(-1)

    def clear_signals(self) -> None:
        self.module.captured = []

    @torch.no_grad()
    def rewire(self, dropped: torch.Tensor, grown: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        module = self.module
        flat = module.flat_index()
        device = flat.device
        dropped, grown = dropped.to(device), grown.to(device)
        keep = ~sorted_contains(dropped.sort().values, flat)
        new_flat = torch.cat([flat[keep], grown])
        order = torch.argsort(new_flat)
        old_nnz = module.nnz

        def carry(per_weight: torch.Tensor) -> torch.Tensor:
            """Kept entries keep their value/state, grown ones start at zero; sorted like new_flat."""
            fresh = torch.zeros(grown.numel(), dtype=per_weight.dtype, device=per_weight.device)
            return torch.cat([per_weight[keep], fresh])[order]

        for optimizer in optimizers:
            state = optimizer.state.get(module.values, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == (old_nnz,):
                    state[key] = carry(value)
        new_flat = new_flat[order]
        if new_flat.numel() != old_nnz - int((~keep).sum()) + grown.numel() or bool((new_flat.diff() <= 0).any()):
            raise RuntimeError(f"layer {self.name}: rewiring produced a duplicate or lost position")
        module.set_pattern(new_flat, carry(module.values.data))
        module.ever_active = torch.cat([module.ever_active, grown]).unique()

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.values

    def after_step(self) -> None:
        """Nothing to restore: pruned weights do not exist."""

    def ever_active_count(self) -> int:
        return self.module.ever_active.numel()

    def remove(self) -> None:
        """No hooks to detach."""

    @torch.no_grad()
    def finalize(self, dense: bool) -> nn.Module:
        """The `CSRLinear` itself (truly sparse inference), or with `dense` an `nn.Linear` with
        the same weights."""
        module = self.module
        module.capture, module.captured = False, []
        if not dense:
            return module
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.values.device,
            dtype=module.values.dtype,
        )
        linear.weight.copy_(module.to_dense())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        return linear


def to_csr(model: nn.Module, name: str, linear: nn.Linear, flat: torch.Tensor) -> CSRLayer:
    """Replace the `nn.Linear` called `name` in `model` by a `CSRLinear` holding the weights at
    the sorted flat positions `flat`."""
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"backend 'csr' supports nn.Linear layers only; {name} is {type(linear).__name__} "
            "(exclude it, or use backend 'masked')"
        )
    if name == "model":
        raise ValueError("backend 'csr' replaces layers inside a model; wrap a bare nn.Linear in nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = CSRLinear.from_linear(linear, flat)
    setattr(parent, child, module)
    return CSRLayer(name, module)


__all__ = ["CSRLayer", "CSRLinear", "to_csr"]
