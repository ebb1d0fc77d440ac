"""Memory planner: peak device memory and peak system RAM of a training run, from file headers and flags only.

The estimate adds up what a step holds at its peak (end of forward / start of backward):
- frozen weights by storage dtype (fp8 Linear weights are 1 byte; biases and norms keep the weight dtype), minus
  the swapped blocks, plus the swap ring (2 slots per block kind);
- text encoders and autoencoder as `load_models` leaves them for training (`components.residency_for`): on the
  device, unless their outputs are cached (text encoders freed; AE on the host, decoding samples only);
- the caching phase before training (AE, then text encoders, with their encode batch) as a second device peak;
  the reported device peak is the larger phase;
- LoRA parameters, their gradients and the optimizer state (per-optimizer state count);
- activations: bytes per token per block, measured once with `torch.autograd.graph.saved_tensors_hooks` on a
  width-256 block with rank-4 LoRA (fp32, and bf16 autocast) and scaled by the width; a checkpointed block keeps
  only its inputs, an un-checkpointed one its full activations; the peak is the larger of the start of backward
  and the recompute of a checkpointed block (while the un-checkpointed blocks before it still hold theirs);
- host RAM: the process itself, the model files read (memory-mapped pages count), swapped blocks (pinned).
It says whether that fits and, if not, what to add (block swap, fp8, checkpointing, and how many blocks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fluxlora.families.base import ModelShape
from fluxlora.training.blocks import checkpointed_positions
from fluxlora.training.memory import DEFAULT_RING_SIZE, max_blocks_to_swap, swap_split

logger = logging.getLogger(__name__)

GB = 1e9
# Backward holds the gradients of a block's activations next to them: about one more block's worth.
BACKWARD_BLOCKS = 1.0
OPTIMIZER_STATES = {  # state tensors per LoRA parameter (fp32 unless noted), by sd-scripts optimizer name
    "adamw": 2.0, "adam": 2.0, "adamw8bit": 0.5, "pagedadamw8bit": 0.5, "lion": 1.0, "lion8bit": 0.25, "sgdnesterov": 1.0,
    "sgd": 0.0, "adafactor": 0.05, "prodigy": 4.0, "dadaptadam": 3.0, "adamwschedulefree": 2.0, "radamschedulefree": 2.0,
}
RUNTIME_HOST_BYTES = 0.9 * GB  # python + torch + transformers imported, before any model (measured on this project)


def _dtype_key(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype in (None, torch.float32) else "bf16"


@dataclass(frozen=True)
class Workload:
    """What a run puts in memory; every field comes from flags or file headers."""

    shape: ModelShape
    batch_size: int = 1
    image_tokens: int = 4096  # packed latent tokens per image (pixels / 256)
    text_tokens: int = 512
    weight_dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    compute_dtype: torch.dtype | None = torch.bfloat16  # autocast dtype; None = no autocast (fp32)
    lora_rank: int = 16
    lora_dtype: torch.dtype = torch.float32
    adapter_params: int | None = None  # adapters: trainable parameters of a LoKr/LoHa/full/DoRA network (None: LoRA)
    optimizer_states: float = 2.0
    gradient_checkpointing: bool = False
    checkpoint_blocks: int | None = None  # blocks checkpointed with gradient_checkpointing; None = all of them
    cpu_offload_checkpointing: bool = False
    blocks_to_swap: int = 0
    other_device_bytes: int = 0  # text encoders + autoencoder on the device while training
    caching_device: tuple[tuple[str, int], ...] = ()  # the caching phase before training: (what, bytes)
    other_host_bytes: int = 0  # their files as read


@dataclass
class MemoryPlan:
    device: dict[str, int] = field(default_factory=dict)  # the training phase
    host: dict[str, int] = field(default_factory=dict)
    caching: dict[str, int] = field(default_factory=dict)  # the caching phase (before the DiT is loaded)

    @property
    def training_peak(self) -> int:
        return sum(self.device.values())

    @property
    def caching_peak(self) -> int:
        return sum(self.caching.values())

    @property
    def device_peak(self) -> int:
        """The larger phase: the caching models leave the device before the DiT comes (`load_models`)."""
        return max(self.training_peak, self.caching_peak)

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def cpu_peak(self) -> int:
        """Peak RAM when the CPU is the training device: device and host are one memory, so the larger phase plus
        the runtime and whatever else stays on the host. The files read are not added: they are memory-mapped and
        become the weights as they are read (benchmarks/load.py: peak RSS ÷ file size 1.007)."""
        return self.device_peak + sum(v for k, v in self.host.items() if k != "model files read")

    def lines(self) -> list[str]:
        def part(items: dict[str, int]) -> str:
            return ", ".join(f"{k} {v / GB:.2f}" for k, v in items.items() if v)

        if self.caching:
            return [f"device peak ≈ {self.device_peak / GB:.2f} GB, the larger of two phases:",
                    f"  caching ≈ {self.caching_peak / GB:.2f} GB ({part(self.caching)})",
                    f"  training ≈ {self.training_peak / GB:.2f} GB ({part(self.device)})",
                    f"system RAM peak ≈ {self.host_peak / GB:.2f} GB ({part(self.host)})"]
        return [f"device peak ≈ {self.device_peak / GB:.2f} GB ({part(self.device)})",
                f"system RAM peak ≈ {self.host_peak / GB:.2f} GB ({part(self.host)})"]


def estimate(w: Workload) -> MemoryPlan:
    """The memory plan of one workload (see the module docstring for what is counted)."""
    m = w.shape
    wbytes = torch.empty((), dtype=w.weight_dtype).element_size()
    double, single = m.double_params, m.single_params

    def block_bytes(n: int, n_linear: int) -> int:
        if not w.fp8:
            return n * wbytes
        return n_linear * 1 + (n - n_linear) * wbytes  # fp8 weights, other tensors in the weight dtype

    double_b, single_b = block_bytes(double, m.double_linear_params), block_bytes(single, m.single_linear_params)
    outer_b = m.outer_params * wbytes
    swap_d, swap_s = swap_split(w.blocks_to_swap) if w.blocks_to_swap else (0, 0)
    ring = (min(DEFAULT_RING_SIZE, swap_d) * double_b + min(DEFAULT_RING_SIZE, swap_s) * single_b)
    resident = (m.double_blocks - swap_d) * double_b + (m.single_blocks - swap_s) * single_b + outer_b + ring
    plan = MemoryPlan()
    plan.device["DiT weights"] = resident

    lora_n = w.adapter_params if w.adapter_params is not None else m.lora_params_per_rank * w.lora_rank  # adapters
    lb = torch.empty((), dtype=w.lora_dtype).element_size()
    plan.device["LoRA + grads"] = 2 * lora_n * lb
    plan.device["optimizer state"] = int(w.optimizer_states * lora_n * 4)
    plan.device["text encoders + AE"] = w.other_device_bytes
    plan.caching.update(w.caching_device)

    tokens = w.batch_size * (w.image_tokens + w.text_tokens)
    key = _dtype_key(w.compute_dtype)
    per_double = m.activation_bytes[(key, "double")] * m.width * tokens
    per_single = m.activation_bytes[(key, "single")] * m.width * tokens
    abytes = 4 if key == "fp32" else 2
    per_block = [per_double] * m.double_blocks + [per_single] * m.single_blocks
    ckpt = checkpointed_blocks(w)
    grads = BACKWARD_BLOCKS * max(per_double, per_single)
    # start of backward: every un-checkpointed block's activations, and the gradients of the block in backward
    full = sum(a for i, a in enumerate(per_block) if i not in ckpt)
    peak = full + grads
    held_before = 0.0  # activations of un-checkpointed blocks that run before (so are backpropagated after) block j
    for j, a in enumerate(per_block):
        if j in ckpt:
            peak = max(peak, held_before + a + grads)  # block j recomputed while those are still held
        else:
            held_before += a
    if ckpt:
        # each checkpointed block keeps only its inputs (double: img + txt; single: the joint sequence)
        kept = len(ckpt) * tokens * m.width * abytes
        if w.cpu_offload_checkpointing:
            plan.host["checkpointed block inputs"] = kept
            kept = 0
        plan.device["activations (checkpointed)"] = int(kept + peak)
    else:
        plan.device["activations"] = int(peak)
    # embeddings, RoPE table, loss, latents and text states of the batch
    plan.device["inputs"] = int(tokens * (m.width * 4 + m.head_dim * 4 * 2 + m.context_dim * 4))

    plan.host["runtime"] = int(RUNTIME_HOST_BYTES)
    plan.host["swapped blocks (pinned)"] = swap_d * double_b + swap_s * single_b
    plan.host["model files read"] = w.other_host_bytes
    return plan


def checkpointed_blocks(w: Workload) -> frozenset[int]:
    """Execution-order positions of the blocks `w` checkpoints (swapped blocks always are; see
    `fluxlora.training.blocks.checkpointed_positions`)."""
    m = w.shape
    total = m.double_blocks + m.single_blocks
    if not w.gradient_checkpointing:
        return frozenset()
    swap_d, swap_s = swap_split(w.blocks_to_swap) if w.blocks_to_swap else (0, 0)
    swapped = [*range(m.double_blocks - swap_d, m.double_blocks), *range(total - swap_s, total)]
    n = total if w.checkpoint_blocks is None else max(w.checkpoint_blocks, len(swapped))
    chosen = checkpointed_positions(total, n, swapped)
    return frozenset(range(total)) if chosen is None else chosen


def smallest_checkpoint_blocks_that_fit(w: Workload, available: int) -> int | None:
    """The fewest checkpointed blocks (with gradient checkpointing on, at least the swapped ones) whose estimate
    fits `available` device bytes; None when even all of them do not fit."""
    swapped = sum(swap_split(w.blocks_to_swap)) if w.blocks_to_swap else 0
    for n in range(swapped, w.shape.double_blocks + w.shape.single_blocks + 1):
        plan = estimate(_replace(w, gradient_checkpointing=True, checkpoint_blocks=n))
        if plan.training_peak <= available:  # checkpointing only helps training
            return n
    return None


def fits_advice(w: Workload, available: int) -> str | None:
    """None when `w` fits in `available` device bytes; otherwise the cheapest change that makes it fit."""
    if estimate(w).device_peak <= available:
        return None
    if estimate(w).caching_peak > available:  # no training flag changes the phase before training
        return ("the caching phase (text encoders or AE with their encode batch) alone does not fit: lower "
                "--text_encoder_batch_size / --vae_batch_size, or use an fp8 T5 file with --fp8_base")
    tries: list[tuple[str, Workload]] = []
    total = w.shape.double_blocks + w.shape.single_blocks
    n = smallest_checkpoint_blocks_that_fit(w, available)
    if n is not None:  # checkpointing only as many blocks as needed is the fastest fix
        if not w.gradient_checkpointing:
            hint = "add --gradient_checkpointing" + (f" --checkpoint_blocks {n}" if n < total else "")
        else:
            hint = f"set --checkpoint_blocks {n}" if n < total else "remove --checkpoint_blocks (checkpoint every block)"
        tries.append((hint, _replace(w, gradient_checkpointing=True, checkpoint_blocks=n)))
    ckpt = _replace(w, gradient_checkpointing=True, checkpoint_blocks=None)
    if not w.fp8 and w.compute_dtype is not None:
        tries.append(("add --gradient_checkpointing --fp8_base" if not w.gradient_checkpointing else "add --fp8_base",
                      _replace(ckpt, fp8=True)))
    limit = max_blocks_to_swap(w.shape.double_blocks, w.shape.single_blocks)
    for base_hint, base in (("", ckpt), (" --fp8_base", _replace(ckpt, fp8=True))):
        if base_hint and (w.fp8 or w.compute_dtype is None):
            continue
        for n in range(max(1, w.blocks_to_swap + 1), limit + 1):
            if estimate(_replace(base, blocks_to_swap=n)).device_peak <= available:
                flags = f"--blocks_to_swap {n}{base_hint}"
                if not w.gradient_checkpointing:
                    flags += " --gradient_checkpointing"
                tries.append((f"add {flags}", _replace(base, blocks_to_swap=n)))
                break
    for hint, candidate in tries:
        if estimate(candidate).device_peak <= available:
            drop = w.checkpoint_blocks is not None and candidate.checkpoint_blocks is None  # it needs every block
            return hint + (" and remove --checkpoint_blocks" if drop else "")
    return "even the largest block swap with fp8 does not fit: lower the resolution or batch size, or use a larger GPU"


def _replace(w: Workload, **changes) -> Workload:
    from dataclasses import replace

    return replace(w, **changes)


def smallest_swap_that_fits(w: Workload, available: int) -> int | None:
    limit = max_blocks_to_swap(w.shape.double_blocks, w.shape.single_blocks)
    for n in range(0, limit + 1):
        if estimate(_replace(w, blocks_to_swap=n)).training_peak <= available:  # swapping only helps training
            return n
    return None


# ---- resolving `auto` and reporting (pure: the free memory is an argument) ---------------------------------------
def auto_blocks_to_swap(w: Workload, free: int) -> int:
    """`--blocks_to_swap auto`: the smallest N whose estimate fits 95 % of `free` device bytes (the largest swap
    when none does)."""
    n = smallest_swap_that_fits(_replace(w, blocks_to_swap=0), int(0.95 * free))
    if n is None:
        n = max_blocks_to_swap(w.shape.double_blocks, w.shape.single_blocks)
        logger.warning("--blocks_to_swap auto: even %d swapped blocks are estimated not to fit %.1f GB free", n,
                       free / GB)
    logger.info("--blocks_to_swap auto: %d (estimated device peak %.2f GB of %.2f GB free)", n,
                estimate(_replace(w, blocks_to_swap=n)).device_peak / GB, free / GB)
    return n


def auto_checkpoint_blocks(w: Workload, free: int) -> int:
    """`--checkpoint_blocks auto`: the fewest blocks (at least the swapped ones) whose estimate fits 95 % of `free`
    device bytes (all of them when none does)."""
    total = w.shape.double_blocks + w.shape.single_blocks
    chosen = smallest_checkpoint_blocks_that_fit(w, int(0.95 * free))
    if chosen is None:
        chosen = total
        logger.warning("--checkpoint_blocks auto: even all %d blocks checkpointed are estimated not to fit %.1f GB "
                       "free", total, free / GB)
    logger.info("--checkpoint_blocks auto: %d of %d blocks (estimated device peak %.2f GB of %.2f GB free)", chosen,
                total, estimate(_replace(w, checkpoint_blocks=chosen)).device_peak / GB, free / GB)
    return chosen


def report(w: Workload, *, device_name: str, free: int, ram: int, checkpoint_flag: int | str | None) -> list[str]:
    """Lines for `fluxlora check` and the start of training: the estimate, and whether (and how) it fits a device
    with `free` bytes (`device_name` "CPU": device and system RAM are one memory of `ram` bytes)."""
    plan = estimate(w)
    lines = [f"memory plan ({w.batch_size}×{w.image_tokens} image + {w.text_tokens} text tokens):", *plan.lines()]
    cpu = device_name == "CPU"
    need = plan.cpu_peak if cpu else plan.device_peak
    if cpu:
        lines.append(f"CPU only: device and system RAM are one memory, peak ≈ {need / GB:.2f} GB")
    if need <= free:
        lines.append(f"fits {device_name} ({free / GB:.1f} GB {'RAM' if cpu else 'free'})")
    else:
        lines.append(f"does NOT fit {device_name} ({free / GB:.1f} GB free): {fits_advice(w, free)}")
    if not cpu and plan.host_peak > ram:
        lines.append(f"system RAM {ram / GB:.1f} GB is below the estimated {plan.host_peak / GB:.1f} GB peak")
    lines.append(_checkpoint_line(w, checkpoint_flag, None if cpu else int(0.95 * free)))
    return lines


def _checkpoint_line(w: Workload, flag: int | str | None, available: int | None) -> str:
    """How many blocks are checkpointed, and how many would do here (`available` device bytes; None on a CPU)."""
    total = w.shape.double_blocks + w.shape.single_blocks
    if not w.gradient_checkpointing:
        return f"gradient checkpointing: off (all {total} blocks keep their activations)"
    fewest = None if available is None else smallest_checkpoint_blocks_that_fit(w, available)
    if flag == "auto":
        n = total if fewest is None else fewest
        why = "without a GPU auto checkpoints every block" if available is None else "the fewest that fit"
        return f"gradient checkpointing: {n} of {total} blocks (--checkpoint_blocks auto: {why})"
    n = len(checkpointed_blocks(w))
    line = f"gradient checkpointing: {n} of {total} blocks"
    if fewest is not None and fewest < n:
        line += f"; {fewest} would fit 95 % of the free memory here (--checkpoint_blocks {fewest} or auto: faster)"
    return line
