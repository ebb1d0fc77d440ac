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
import os
from dataclasses import dataclass, field

import torch

from fluxlora.errors import ConfigError
from fluxlora.models.flux import FluxParams, checkpointed_positions
from fluxlora.training.memory import DEFAULT_RING_SIZE, max_blocks_to_swap, swap_split

logger = logging.getLogger(__name__)

GB = 1e9
# Saved-for-backward bytes per token per unit of width for one block (LoRA on every Linear). Measured with
# saved_tensors_hooks at width 256 (see module docstring); "bf16" is bf16 autocast over bf16 activations.
ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH = {
    ("fp32", "double"): 102.5, ("fp32", "single"): 82.3,
    ("bf16", "double"): 54.3, ("bf16", "single"): 50.3,
}
# Backward holds the gradients of a block's activations next to them: about one more block's worth.
BACKWARD_BLOCKS = 1.0
OPTIMIZER_STATES = {  # state tensors per LoRA parameter (fp32 unless noted), by sd-scripts optimizer name
    "adamw": 2.0, "adam": 2.0, "adamw8bit": 0.5, "pagedadamw8bit": 0.5, "lion": 1.0, "lion8bit": 0.25, "sgdnesterov": 1.0,
    "sgd": 0.0, "adafactor": 0.05, "prodigy": 4.0, "dadaptadam": 3.0, "adamwschedulefree": 2.0, "radamschedulefree": 2.0,
}
# Full-resolution 128-channel maps the AE encoder holds at once (a ResNet block's input, GroupNorm output, SiLU
# output, conv output); see `ae_encode_bytes`.
AE_ENCODE_MAPS = 4
RUNTIME_HOST_BYTES = 0.9 * GB  # python + torch + transformers imported, before any model (measured on this project)


def _dtype_key(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype in (None, torch.float32) else "bf16"


@dataclass(frozen=True)
class Workload:
    """What a run puts in memory; every field comes from flags or file headers."""

    params: FluxParams
    batch_size: int = 1
    image_tokens: int = 4096  # packed latent tokens per image (pixels / 256)
    text_tokens: int = 512
    weight_dtype: torch.dtype = torch.bfloat16
    fp8: bool = False
    compute_dtype: torch.dtype | None = torch.bfloat16  # autocast dtype; None = no autocast (fp32)
    lora_rank: int = 16
    lora_dtype: torch.dtype = torch.float32
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


def block_params(p: FluxParams) -> tuple[int, int, int, int]:
    """(double-block params, single-block params, per-token Linear params of a double-block stream, LoRA in+out sum
    of one double and one single block) from the hyper-parameters."""
    h, m = p.hidden_size, p.mlp_hidden_dim
    hd = p.head_dim
    stream = [(h, 6 * h), (h, 3 * h), (h, h), (h, m), (m, h)]  # mod, qkv, proj, mlp.0, mlp.2
    double_linear = 2 * sum(i * o for i, o in stream)
    double_bias = 2 * (6 * h + (3 * h if p.qkv_bias else 0) + h + m + h)
    double = double_linear + double_bias + 2 * 2 * hd  # + QK-norm scales
    single_l = [(h, 3 * h + m), (h + m, h), (h, 3 * h)]
    single = sum(i * o + o for i, o in single_l) + 2 * hd
    lora_io = 2 * sum(i + o for i, o in stream), sum(i + o for i, o in single_l)
    return double, single, sum(i * o for i, o in stream[1:]), lora_io[0] + lora_io[1]


def _linear_weight_params(p: FluxParams) -> tuple[int, int]:
    h, m = p.hidden_size, p.mlp_hidden_dim
    double = 2 * (h * 6 * h + h * 3 * h + h * h + h * m + m * h)
    single = h * (3 * h + m) + (h + m) * h + h * 3 * h
    return double, single


def flux_param_count(p: FluxParams) -> int:
    h = p.hidden_size
    double, single, _, _ = block_params(p)
    outer = (p.in_channels * h + h) + 2 * (256 * h + h + h * h + h) + (p.vec_in_dim * h + h + h * h + h)
    outer -= 0 if p.guidance_embed else (256 * h + h + h * h + h)
    outer += p.context_in_dim * h + h + (h * 2 * h + 2 * h) + (h * p.in_channels + p.in_channels)
    return p.depth * double + p.depth_single_blocks * single + outer


def lora_param_count(p: FluxParams, rank: int) -> int:
    h, m = p.hidden_size, p.mlp_hidden_dim
    stream = [(h, 6 * h), (h, 3 * h), (h, h), (h, m), (m, h)]
    single = [(h, 3 * h + m), (h + m, h), (h, 3 * h)]
    return rank * (p.depth * 2 * sum(i + o for i, o in stream) + p.depth_single_blocks * sum(i + o for i, o in single))


def estimate(w: Workload) -> MemoryPlan:
    """The memory plan of one workload (see the module docstring for what is counted)."""
    p = w.params
    wbytes = torch.empty((), dtype=w.weight_dtype).element_size()
    double, single, _, _ = block_params(p)
    lin_double, lin_single = _linear_weight_params(p)

    def block_bytes(n: int, n_linear: int) -> int:
        if not w.fp8:
            return n * wbytes
        return n_linear * 1 + (n - n_linear) * wbytes + 4 * 0  # fp8 weights, other tensors in the weight dtype

    double_b, single_b = block_bytes(double, lin_double), block_bytes(single, lin_single)
    total = flux_param_count(p)
    outer_b = (total - p.depth * double - p.depth_single_blocks * single) * wbytes
    swap_d, swap_s = swap_split(w.blocks_to_swap) if w.blocks_to_swap else (0, 0)
    ring = (min(DEFAULT_RING_SIZE, swap_d) * double_b + min(DEFAULT_RING_SIZE, swap_s) * single_b)
    resident = (p.depth - swap_d) * double_b + (p.depth_single_blocks - swap_s) * single_b + outer_b + ring
    plan = MemoryPlan()
    plan.device["DiT weights"] = resident

    lora_n = lora_param_count(p, w.lora_rank)
    lb = torch.empty((), dtype=w.lora_dtype).element_size()
    plan.device["LoRA + grads"] = 2 * lora_n * lb
    plan.device["optimizer state"] = int(w.optimizer_states * lora_n * 4)
    plan.device["text encoders + AE"] = w.other_device_bytes
    plan.caching.update(w.caching_device)

    tokens = w.batch_size * (w.image_tokens + w.text_tokens)
    key = _dtype_key(w.compute_dtype)
    per_double = ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[(key, "double")] * p.hidden_size * tokens
    per_single = ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[(key, "single")] * p.hidden_size * tokens
    abytes = 4 if key == "fp32" else 2
    per_block = [per_double] * p.depth + [per_single] * p.depth_single_blocks
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
        kept = len(ckpt) * tokens * p.hidden_size * abytes
        if w.cpu_offload_checkpointing:
            plan.host["checkpointed block inputs"] = kept
            kept = 0
        plan.device["activations (checkpointed)"] = int(kept + peak)
    else:
        plan.device["activations"] = int(peak)
    # embeddings, RoPE table, loss, latents and text states of the batch
    plan.device["inputs"] = int(tokens * (p.hidden_size * 4 + p.head_dim * 4 * 2 + p.context_in_dim * 4))

    plan.host["runtime"] = int(RUNTIME_HOST_BYTES)
    plan.host["swapped blocks (pinned)"] = swap_d * double_b + swap_s * single_b
    plan.host["model files read"] = w.other_host_bytes
    return plan


def checkpointed_blocks(w: Workload) -> frozenset[int]:
    """Execution-order positions of the blocks `w` checkpoints (swapped blocks always are; see
    `fluxlora.models.flux.checkpointed_positions`)."""
    p = w.params
    total = p.depth + p.depth_single_blocks
    if not w.gradient_checkpointing:
        return frozenset()
    swap_d, swap_s = swap_split(w.blocks_to_swap) if w.blocks_to_swap else (0, 0)
    swapped = [*range(p.depth - swap_d, p.depth), *range(total - swap_s, total)]
    n = total if w.checkpoint_blocks is None else max(w.checkpoint_blocks, len(swapped))
    chosen = checkpointed_positions(p.depth, p.depth_single_blocks, n, swapped)
    return frozenset(range(total)) if chosen is None else chosen


def smallest_checkpoint_blocks_that_fit(w: Workload, available: int) -> int | None:
    """The fewest checkpointed blocks (with gradient checkpointing on, at least the swapped ones) whose estimate
    fits `available` device bytes; None when even all of them do not fit."""
    p = w.params
    swapped = sum(swap_split(w.blocks_to_swap)) if w.blocks_to_swap else 0
    for n in range(swapped, p.depth + p.depth_single_blocks + 1):
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
    total = w.params.depth + w.params.depth_single_blocks
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
    limit = max_blocks_to_swap(w.params.depth, w.params.depth_single_blocks)
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
    limit = max_blocks_to_swap(w.params.depth, w.params.depth_single_blocks)
    for n in range(0, limit + 1):
        if estimate(_replace(w, blocks_to_swap=n)).training_peak <= available:  # swapping only helps training
            return n
    return None


# ---- from a TrainConfig -------------------------------------------------------------------------------------------
def workload_for(cfg, info, blueprint, t5_max_length: int, *, blocks_to_swap: int | None = None) -> Workload:
    """The workload of a parsed config, its FLUX header info and dataset blueprint (nothing is loaded)."""
    from fluxlora.models.checkpoints import read_header
    from fluxlora.training.components import precision_for, residency_for

    prec = precision_for(cfg)
    datasets = list(blueprint.datasets)
    biggest = max(datasets, key=lambda d: d.batch_size * d.resolution[0] * d.resolution[1])
    image_tokens = (biggest.resolution[0] // 16) * (biggest.resolution[1] // 16)
    te_dtype = torch.empty((), dtype=prec.weight).element_size()
    ae_dtype = torch.empty((), dtype=prec.ae).element_size()
    loaded: dict[str, int] = {}  # device bytes of each frozen model as load_models casts it
    files: dict[str, int] = {}
    for name, path in (("clip", cfg.model.clip_l), ("t5", cfg.model.t5xxl), ("ae", cfg.model.ae)):
        header = read_header(path)
        keeps_fp8 = name == "t5" and prec.fp8_text_encoders
        size = ae_dtype if name == "ae" else te_dtype
        loaded[name] = sum(c * (1 if keeps_fp8 and "F8" in d else size) for d, c in header.dtype_counts().items())
        files[name] = header.file_size
    res = residency_for(cfg)
    te, ae = loaded["clip"] + loaded["t5"], loaded["ae"]
    other_device = (0 if res.drop_text_encoders else te) + (0 if res.ae_off_device else ae)
    caching = caching_phase(cfg, prec, te, ae, biggest.resolution, t5_max_length)
    # the DiT's file is read after the text encoders are freed (load_models), so their pages need not coexist
    other_host = max(sum(files.values()), files["ae"] + info.size_bytes) if res.drop_text_encoders else \
        sum(files.values()) + info.size_bytes
    opt = cfg.optim.optimizer_type.lower().replace("_", "").split(".")[-1] if cfg.optim.optimizer_type else "adamw"
    swap = cfg.memory.blocks_to_swap if blocks_to_swap is None else blocks_to_swap
    return Workload(
        params=info.params, batch_size=biggest.batch_size, image_tokens=image_tokens,
        text_tokens=t5_max_length, weight_dtype=prec.weight, fp8=prec.fp8,
        compute_dtype=prec.compute if prec.mixed else None, lora_rank=cfg.network.network_dim or 4,
        lora_dtype=prec.lora, optimizer_states=OPTIMIZER_STATES.get(opt, 2.0),
        gradient_checkpointing=cfg.memory.gradient_checkpointing,
        checkpoint_blocks=cfg.memory.checkpoint_blocks if isinstance(cfg.memory.checkpoint_blocks, int) else None,
        cpu_offload_checkpointing=cfg.memory.cpu_offload_checkpointing,
        blocks_to_swap=0 if swap == "auto" else int(swap), other_device_bytes=other_device,
        other_host_bytes=other_host, caching_device=caching,
    )


def ae_encode_bytes(pixels: int, dtype_bytes: int) -> int:
    """Device bytes the FLUX.1 AE encoder holds at once for one image of `pixels` pixels (no grad): a few
    128-channel full-resolution feature maps (`AE_ENCODE_MAPS`) and the float32 input."""
    return int(pixels * (AE_ENCODE_MAPS * 128 * dtype_bytes + 3 * 4))


def t5_encode_bytes(tokens: int, dtype_bytes: int) -> int:
    """Device bytes T5-XXL holds at once for one caption of `tokens` tokens (no grad, analytic): one layer's
    attention scores and their float32 softmax (64 heads), the gated FFN (3 × 10240 wide), a few 4096-wide hidden
    states, and the float32 output the cache copies."""
    heads, d_model, d_ff = 64, 4096, 10240
    return int(heads * tokens ** 2 * (2 * dtype_bytes + 4) + tokens * (3 * d_ff + 5 * d_model) * dtype_bytes
               + tokens * d_model * 4)


def caching_phase(cfg, prec, te_bytes: int, ae_bytes: int, resolution: tuple[int, int],
                  t5_max_length: int) -> tuple[tuple[str, int], ...]:
    """The caching phase's device use, the larger of its two steps (`components.load_models`): the AE encoding
    latents, then CLIP-L + T5 encoding captions (next to the AE when latents are not cached). Empty without
    caching: then the models load straight into the training phase."""
    c = cfg.caching
    steps: list[tuple[tuple[str, int], ...]] = []
    if c.cache_latents:
        ae_dtype = torch.empty((), dtype=prec.ae).element_size()
        steps.append((("AE", ae_bytes),
                      ("AE encode batch", c.vae_batch_size * ae_encode_bytes(resolution[0] * resolution[1], ae_dtype))))
    if c.cache_text_encoder_outputs:
        te_dtype = torch.empty((), dtype=prec.weight).element_size()
        batch = c.text_encoder_batch_size or cfg.dataset_flags.train_batch_size
        steps.append((("text encoders", te_bytes), ("AE", 0 if c.cache_latents else ae_bytes),
                      ("T5 encode batch", batch * t5_encode_bytes(t5_max_length, te_dtype))))
    return max(steps, key=lambda items: sum(b for _, b in items), default=())


def machine_memory() -> tuple[str, int, int]:
    """(device name, free device bytes, total system RAM bytes). Without a GPU the device is the CPU's RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return torch.cuda.get_device_name(), free, ram
    return "CPU", ram, ram


def plan_report(cfg, pre) -> list[str]:
    """Lines for `fluxlora check` and the start of training: the estimate, and whether (and how) it fits here."""
    w = workload_for(cfg, pre.flux_info, pre.blueprint, pre.t5_max_length)
    plan = estimate(w)
    name, free, ram = machine_memory()
    lines = [f"memory plan ({w.batch_size}×{w.image_tokens} image + {w.text_tokens} text tokens):", *plan.lines()]
    cpu = name == "CPU"
    need = plan.cpu_peak if cpu else plan.device_peak
    if cpu:
        lines.append(f"CPU only: device and system RAM are one memory, peak ≈ {need / GB:.2f} GB")
    if need <= free:
        lines.append(f"fits {name} ({free / GB:.1f} GB {'RAM' if cpu else 'free'})")
    else:
        lines.append(f"does NOT fit {name} ({free / GB:.1f} GB free): {fits_advice(w, free)}")
    if not cpu and plan.host_peak > ram:
        lines.append(f"system RAM {ram / GB:.1f} GB is below the estimated {plan.host_peak / GB:.1f} GB peak")
    lines.append(_checkpoint_line(w, cfg.memory.checkpoint_blocks, None if cpu else int(0.95 * free)))
    return lines


def _checkpoint_line(w: Workload, flag: int | str | None, available: int | None) -> str:
    """How many blocks are checkpointed, and how many would do here (`available` device bytes; None on a CPU)."""
    total = w.params.depth + w.params.depth_single_blocks
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


def check_checkpoint_blocks(cfg, info) -> None:
    """Preflight: a numeric --checkpoint_blocks within the model's real block count (from the file header)."""
    n = cfg.memory.checkpoint_blocks
    total = info.params.depth + info.params.depth_single_blocks
    if isinstance(n, int) and n > total:
        raise ConfigError(f"--checkpoint_blocks {n}: this model has {info.params.depth} double and "
                          f"{info.params.depth_single_blocks} single blocks, so at most {total} can be checkpointed; "
                          f"use a value from 0 to {total} (or drop the flag to checkpoint all of them)",
                          key="--checkpoint_blocks")


def resolve_checkpoint_blocks(cfg, info, device: torch.device, blocks_to_swap: int) -> int | None:
    """--checkpoint_blocks as a number of blocks, None = all (or checkpointing off). `auto` = the fewest blocks
    (at least the swapped ones) whose estimate fits 95 % of the free device memory; all of them without a GPU."""
    n = cfg.memory.checkpoint_blocks
    if not cfg.memory.gradient_checkpointing or n is None:
        return None
    total = info.params.depth + info.params.depth_single_blocks
    swapped = sum(swap_split(blocks_to_swap)) if blocks_to_swap else 0
    if n != "auto":
        if n < swapped:  # only with --blocks_to_swap auto; a fixed swap is checked when the flags are parsed
            logger.info("--checkpoint_blocks %d: raised to the %d blocks --blocks_to_swap streams", n, swapped)
        return max(int(n), swapped)
    if torch.device(device).type != "cuda":
        logger.info("--checkpoint_blocks auto: no GPU, all %d blocks are checkpointed", total)
        return None
    from fluxlora.models.tokenizers import t5_max_length_for
    from fluxlora.training.preflight import load_blueprint

    free, _ = torch.cuda.mem_get_info(device)
    w = workload_for(cfg, info, load_blueprint(cfg), t5_max_length_for(info.variant, cfg.flow.t5xxl_max_token_length),
                     blocks_to_swap=blocks_to_swap)
    chosen = smallest_checkpoint_blocks_that_fit(w, int(0.95 * free))
    if chosen is None:
        chosen = total
        logger.warning("--checkpoint_blocks auto: even all %d blocks checkpointed are estimated not to fit %.1f GB "
                       "free", total, free / GB)
    logger.info("--checkpoint_blocks auto: %d of %d blocks (estimated device peak %.2f GB of %.2f GB free)", chosen,
                total, estimate(_replace(w, checkpoint_blocks=chosen)).device_peak / GB, free / GB)
    return chosen


def resolve_blocks_to_swap(cfg, info, device: torch.device) -> int:
    """--blocks_to_swap as a number; `auto` = the smallest N whose estimate fits 95 % of the free device memory."""
    swap = cfg.memory.blocks_to_swap
    if swap != "auto":
        return int(swap)
    if torch.device(device).type != "cuda":
        logger.info("--blocks_to_swap auto: no GPU, nothing to swap")
        return 0
    from fluxlora.models.tokenizers import t5_max_length_for
    from fluxlora.training.preflight import load_blueprint

    free, _ = torch.cuda.mem_get_info(device)
    w = workload_for(cfg, info, load_blueprint(cfg), t5_max_length_for(info.variant, cfg.flow.t5xxl_max_token_length),
                     blocks_to_swap=0)
    n = smallest_swap_that_fits(w, int(0.95 * free))
    if n is None:
        n = max_blocks_to_swap(w.params.depth, w.params.depth_single_blocks)
        logger.warning("--blocks_to_swap auto: even %d swapped blocks are estimated not to fit %.1f GB free", n, free / GB)
    logger.info("--blocks_to_swap auto: %d (estimated device peak %.2f GB of %.2f GB free)", n,
                estimate(_replace(w, blocks_to_swap=n)).device_peak / GB, free / GB)
    return n
