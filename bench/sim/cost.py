"""The simulated engine's step-time model (a roofline) and its hardware and model figures.

A forward pass over T tokens (decode sequences plus prefill-chunk tokens) of a dense decoder costs

    linear    = max(weight bytes / (HBM B/s x eta_bw),  2 x matmul params x T / (peak FLOP/s x eta_flops))
    attention = KV bytes read / (HBM B/s x eta_bw)  +  prefill attention FLOPs / (peak FLOP/s x eta_flops)
    step      = linear + attention + per-forward overhead + constrained sequences x grammar mask cost

Decode is bandwidth-bound (every weight and every cached K/V read once per step); prefill is
compute-bound. eta_bw and eta_flops are the achieved fractions of the datasheet peaks (stated
below, not fitted per workload); `bench.sim` checks the whole model against a published SGLang run
(calibration_ratio). GPU memory, the memory fraction, max_running_requests and chunked_prefill_size
come from kernels_cfg, so the simulated engine is sized exactly as a real run on that profile.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

GIB = 1024**3

# Datasheet peaks (dense, no sparsity). HBM: NVIDIA's product pages (H100 SXM 3.35 TB/s, H200 4.8 TB/s,
# A100 80GB SXM 2.039 TB/s, A100 40GB 1.555 TB/s). bf16 tensor FLOP/s: 989.4 T (Hopper), 312 T (A100);
# fp8 is twice bf16 on Hopper, absent on Ampere.
GPUS: dict[str, dict[str, float]] = {
    "h100-80gb": {"hbm_bytes_s": 3.35e12, "bf16_flops": 989.4e12, "fp8_flops": 1978.9e12},
    "h200-141gb": {"hbm_bytes_s": 4.8e12, "bf16_flops": 989.4e12, "fp8_flops": 1978.9e12},
    "a100-80gb": {"hbm_bytes_s": 2.039e12, "bf16_flops": 312e12, "fp8_flops": 0.0},
    "a100-40gb": {"hbm_bytes_s": 1.555e12, "bf16_flops": 312e12, "fp8_flops": 0.0},
}

# Achieved fractions of peak. Memory-bound decode kernels reach ~80% of HBM peak; eta_flops counts
# everything a prefill-heavy forward does besides the GEMMs at their best (attention, norms,
# sampling, eager launches of non-graph batches), hence well under cuBLAS' ~75%.
ETA_BW = 0.80
ETA_FLOPS = 0.50
OVERHEAD_S = 0.0008  # per forward: launches, sampling, the scheduler's own bookkeeping (overlapped mostly)

# bench.grammar (docs/benchmarks.md): the P1 regex fills 256 token masks in 0.42 ms on one CPU core, i.e.
# 1.64 us per constrained sequence per step; charged on top of the step (no overlap assumed).
MASK_S_PER_SEQ = 0.42e-3 / 256


@dataclass(frozen=True)
class ModelSpec:
    """Llama-3.1-8B: 32 layers, 32 query heads and 8 KV heads of 128 dims, 4096 hidden, 128,256 vocab."""

    name: str = "Llama-3.1-8B"
    params: float = 8.03e9
    embed_params: float = 128_256 * 4096  # the input embedding is a gather, not a matmul
    layers: int = 32
    kv_heads: int = 8
    q_heads: int = 32
    head_dim: int = 128
    weight_bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0

    @property
    def matmul_params(self) -> float:
        return self.params - self.embed_params

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_elem  # K and V

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs for one new token attending to one earlier position (QK^T and AV, all layers)."""
        return 4 * self.layers * self.q_heads * self.head_dim

    def fp8(self) -> ModelSpec:
        return replace(self, name=self.name + " fp8", weight_bytes_per_param=1.0, kv_bytes_per_elem=1.0)


@dataclass(frozen=True)
class CostModel:
    gpu: str
    hbm_bytes_s: float
    flops: float
    model: ModelSpec
    eta_bw: float = ETA_BW
    eta_flops: float = ETA_FLOPS
    overhead_s: float = OVERHEAD_S
    mask_s_per_seq: float = MASK_S_PER_SEQ

    @property
    def bw(self) -> float:
        return self.hbm_bytes_s * self.eta_bw

    @property
    def fl(self) -> float:
        return self.flops * self.eta_flops

    def linear_s(self, tokens: int) -> float:
        m = self.model
        weights = m.matmul_params * m.weight_bytes_per_param / self.bw
        return max(weights, 2 * m.matmul_params * tokens / self.fl)

    def step_s(
        self,
        *,
        decode: int,
        decode_ctx: int,
        prefill: int = 0,
        prefill_pairs: float = 0.0,
        prefill_ctx_read: int = 0,
        constrained: int = 0,
    ) -> float:
        """One forward: `decode` sequences reading `decode_ctx` cached tokens in all, plus `prefill`
        new tokens attending to `prefill_pairs` (token, position) pairs over `prefill_ctx_read`
        cached tokens; `constrained` of the decode sequences need a grammar mask."""
        m = self.model
        kv = (decode_ctx + prefill_ctx_read) * m.kv_bytes_per_token / self.bw
        return (
            self.linear_s(decode + prefill)
            + kv
            + prefill_pairs * m.attn_flops_per_pair / self.fl
            + self.overhead_s
            + constrained * self.mask_s_per_seq
        )

    def decode_run_s(self, k: int, n: int, ctx0: int, constrained: int) -> float:
        """k decode steps of a fixed batch of n sequences whose contexts total ctx0 at the first step
        and grow by n per step (closed form of the sum of step_s)."""
        per = self.linear_s(n) + self.overhead_s + constrained * self.mask_s_per_seq
        kv_tokens = k * ctx0 + n * k * (k - 1) / 2
        return k * per + kv_tokens * self.model.kv_bytes_per_token / self.bw


@dataclass(frozen=True)
class EngineSpec:
    """What the simulated SGLang scheduler is sized by (one GPU, one DP rank)."""

    profile: str
    max_running: int
    kv_tokens: int  # KV pool: max_total_num_tokens
    chunked_prefill: int
    mixed_chunk: bool
    cost: CostModel
    lpm_limit: int = 128  # SGLang's lpm turns into FCFS past this many waiting requests

    def describe(self) -> dict[str, Any]:
        c = self.cost
        return {
            "profile": self.profile,
            "model": c.model.name,
            "max_running_requests": self.max_running,
            "kv_pool_tokens": self.kv_tokens,
            "chunked_prefill_size": self.chunked_prefill,
            "enable_mixed_chunk": self.mixed_chunk,
            "hbm_TB_s": c.hbm_bytes_s / 1e12,
            "peak_TFLOP_s": c.flops / 1e12,
            "eta_bw": c.eta_bw,
            "eta_flops": c.eta_flops,
            "overhead_ms": c.overhead_s * 1e3,
            "grammar_mask_us_per_seq": c.mask_s_per_seq * 1e6,
        }


def engine_spec(
    profile: str,
    *,
    fp8: bool = False,
    model: ModelSpec | None = None,
    overrides: dict[str, Any] | None = None,
    **cost_kw: float,
) -> EngineSpec:
    """The engine a kernels_cfg profile gives an 8B model: KV pool = memory x mem_fraction_static
    minus weights, over KV bytes per token (SGLang's own arithmetic, shown in the TOML files)."""
    from kernels_cfg import load_profile, read_profile

    args = load_profile(profile, model_size_b=8, fp8=fp8, overrides=overrides)
    meta = read_profile(profile)["meta"]
    hw = GPUS[profile]
    m = model or ModelSpec()
    if fp8:
        m = m.fp8()
    flops = hw["fp8_flops"] if fp8 else hw["bf16_flops"]
    if not flops:
        raise ValueError(f"{profile} has no fp8 tensor cores; drop --fp8")
    static = meta["memory_mib"] * 1024**2 * args["mem_fraction_static"]
    kv_tokens = int((static - m.params * m.weight_bytes_per_param) / m.kv_bytes_per_token)
    cost = CostModel(profile, hw["hbm_bytes_s"], flops, m, **cost_kw)
    return EngineSpec(
        profile,
        int(args["max_running_requests"]),
        kv_tokens,
        int(args["chunked_prefill_size"]),
        bool(args.get("enable_mixed_chunk", False)),
        cost,
    )
