"""The trainable parameters as the probe sees them: one fixed named order, one flat fp32 layout, and the
names by which PEFT, the Trainer and the report refer to them."""

from __future__ import annotations

import torch

PEFT_PREFIXES = ("base_model.model.", "module.")
LORA_MARKERS = (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def canonical_name(name: str) -> str:
    """A parameter name without PEFT's wrapper prefix and adapter name, which differ across save/load."""
    for prefix in PEFT_PREFIXES:
        name = name.removeprefix(prefix)
    return name.replace(".default.", ".")


def param_names(model: torch.nn.Module, params: list[torch.Tensor]) -> list[str]:
    """The model's name for each parameter object; a placeholder where the object is not in the model."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id.get(id(p), f"params[{i}] (not a parameter of the model)") for i, p in enumerate(params)]


class FlatLayout:
    """Where each trainable tensor lives in one flat fp32 vector. Every tensor starts on a block boundary,
    so per-tensor dot products are one blocked reduction and a cumulative sum: a handful of kernels for
    any number of tensors, and no host synchronisation."""

    def __init__(self, params: list[torch.nn.Parameter], block: int = 1024):
        self.block = block
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.offsets: list[int] = []
        end = 0
        for n in self.sizes:
            self.offsets.append(end)
            end += -(-n // block) * block
        self.n = end  # padded length; the padding stays zero
        first = torch.tensor([o // block for o in self.offsets])
        last = torch.tensor([(o + -(-n // block) * block) // block for o, n in zip(self.offsets, self.sizes)])
        self._bounds = {"cpu": (first, last)}

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(shape) for o, n, shape in zip(self.offsets, self.sizes, self.shapes)]

    def gather(self, tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """One flat fp32 vector at this layout's offsets (zero padding) from per-tensor values."""
        flat = torch.zeros(self.n, device=device)
        for view, t in zip(self.views(flat), tensors):
            view.copy_(t.reshape(view.shape))
        return flat

    def dots(self, a: torch.Tensor, b: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
        """Per-tensor a.b in fp64 [n_tensors]: fp32 products (into tmp when given), fp64 sums."""
        key = str(a.device)
        if key not in self._bounds:
            self._bounds[key] = tuple(t.to(a.device) for t in self._bounds["cpu"])
        first, last = self._bounds[key]
        prod = torch.mul(a, b, out=tmp) if tmp is not None else a * b
        blocks = prod.view(-1, self.block).sum(1, dtype=torch.float64)
        c = torch.cat([blocks.new_zeros(1), blocks.cumsum(0)])
        return c[last] - c[first]

    def cross_dots(self, a: torch.Tensor, b: torch.Tensor, cols: int = 8192) -> torch.Tensor:
        """a[u].b[v] for every pair of rows in fp64 [m_a, m_b]: fp32 matrix products over short column
        slabs, summed in fp64. Its row sums X[u].sum Y carry the large X[u].Y[u] that the row means
        subtract again, so one long fp32 accumulation (relative error ~1e-5 at 4M columns) would be too
        coarse; 8192 columns keep it near 1e-8, and each slab is read once for all m^2 dots. On CUDA the
        products are fp64 over 2^20-column slabs (exact to fp64; milliseconds for a bank of tens of GB)."""
        if a.is_cuda:
            out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
            for s in range(0, a.shape[1], 1 << 20):
                out += a[:, s:s + (1 << 20)].double() @ b[:, s:s + (1 << 20)].double().T
            return out
        out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
        for s in range(0, a.shape[1], cols):
            out += (a[:, s:s + cols] @ b[:, s:s + cols].T).double()
        return out


class GradReader:
    """Adds the current .grad of every trainable tensor into one flat fp32 buffer at a FlatLayout's offsets
    (default: packed end to end, FlatLayout(params, block=1))."""

    def __init__(self, params: list[torch.nn.Parameter], layout: FlatLayout | None = None):
        self.params = params
        layout = layout if layout is not None else FlatLayout(params, block=1)
        self.sizes = layout.sizes
        self.offsets = layout.offsets

    def add(self, out: torch.Tensor) -> int:
        present = 0
        for p, start, n in zip(self.params, self.offsets, self.sizes):
            if p.grad is not None:
                out[start:start + n].add_(p.grad.reshape(-1).to(out.device, torch.float32))
                present += 1
        return present


class FlatGrads:
    """Points every trainable tensor's .grad at its slice of a flat fp32 buffer, so that backward() adds
    straight into the buffer (AccumulateGrad accumulates in place into an existing .grad): no per-tensor
    copies, no fresh gradient tensors per backward. Counts the tensors each backward reached."""

    def __init__(self, params: list[torch.nn.Parameter], layout: FlatLayout):
        self.params = params
        self.layout = layout
        self._views: dict[int, list[torch.Tensor]] = {}
        self._seen: set[int] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._mark) for p in params]

    @staticmethod
    def usable(params: list[torch.nn.Parameter]) -> bool:
        return bool(params) and all(p.dtype == torch.float32 and p.device == params[0].device for p in params)

    def _mark(self, p: torch.Tensor) -> None:
        self._seen.add(id(p))

    def point(self, flat: torch.Tensor) -> None:
        views = self._views.setdefault(id(flat), self.layout.views(flat))
        for p, v in zip(self.params, views):
            p.grad = v

    def take(self) -> int:
        """Tensors reached since the last call."""
        n = len(self._seen)
        self._seen.clear()
        return n

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for p in self.params:
            p.grad = None


def module_name(param_name: str) -> str:
    """'...layers.0.self_attn.q_proj.lora_A.default.weight' -> 'layers.0.self_attn.q_proj'."""
    name = param_name.replace("base_model.model.", "")
    for marker in LORA_MARKERS:
        if marker in name:
            return name.split(marker)[0].removeprefix("model.")
    return name.rsplit(".", 1)[0].removeprefix("model.")


def layer_name(param_name: str) -> str:
    parts = param_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return "other"
