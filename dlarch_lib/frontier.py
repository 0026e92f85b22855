"""Chapter 30's outlook, in code: five directions of current work, each small enough to run on a CPU.

- **FlashAttention** (IO-aware exact attention): :func:`flash_attention`, tiled attention with the online
  softmax (a running maximum and a running sum per query row); :func:`flash_tiles` chooses the tiles that
  fit an on-chip memory of ``M`` numbers; :func:`attention_hbm_traffic` counts the numbers that standard
  and tiled attention move between on-chip memory and HBM.
- **Mixture of experts**: :class:`MoE`, a top-``k`` router over small MLP experts with the Switch/GShard
  load-balancing loss (:func:`load_balancing_loss`); :func:`moe_cost` counts its parameters and the FLOPs
  one token uses; :func:`routing_specialisation` measures how far the experts specialise.
- **State-space models**: a diagonal linear SSM (S4D-like), computed as a recurrence
  (:func:`ssm_recurrence`) and as a causal convolution with the kernel :func:`ssm_kernel`
  (:func:`causal_conv_fft`); :func:`ssm_flops` counts each mode; :func:`selective_scan` is the
  input-dependent (Mamba-style) variant, which only a scan can compute.
- **Diffusion**: :func:`ddim_sample`, deterministic DDIM sampling with few steps from chapter 27's
  :class:`~dlarch_lib.diffusion.Denoiser`.
- **Instruction tuning and preference optimisation**: :func:`sft_labels` / :func:`sft_loss`, the
  next-token loss masked on the prompt; :func:`dpo_loss`, the DPO loss derived from the Bradley-Terry model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.train import model_device
from dlarch_lib.diffusion import NoiseSchedule
from dlarch_lib.distill import IGNORE  # F.cross_entropy's default ignore_index

# ---------------------------------------------------------------------------------------------------------------
# FlashAttention
# ---------------------------------------------------------------------------------------------------------------


def flash_tiles(d: int, M: int) -> tuple[int, int]:
    """Tile sizes ``(B_r, B_c)`` (query rows, key rows) for head size ``d`` and on-chip memory of ``M`` numbers.

    ``B_r = floor(M / (5 d))`` and ``B_c = min(B_r, d)``: the tiles ``Q_i, O_i`` (``B_r x d`` each), ``K_j, V_j``
    (``B_c x d`` each) and the scores ``S_ij`` (``B_r x B_c``) then use at most ``M`` numbers.
    """
    if d < 1 or M < 5 * d:
        raise ValueError(f"need d >= 1 and M >= 5 d (room for one row of every tile), got d = {d}, M = {M}")
    b_r = M // (5 * d)
    return b_r, min(b_r, d)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int = 16,
    block_k: int = 16,
    causal: bool = False,
    traffic: dict[str, int] | None = None,
) -> torch.Tensor:
    """Exact softmax attention computed tile by tile with the online softmax (FlashAttention's forward pass).

    ``q (..., T, d)``, ``k (..., S, d)``, ``v (..., S, d_v)`` -> ``(..., T, d_v)``, equal to
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)``. For each block of ``block_q`` query rows
    the loop visits the key blocks, keeps a running row maximum ``m``, a running sum ``l`` of
    ``exp(s - m)`` and an unnormalised output ``o``, rescales them by ``exp(m_old - m_new)`` whenever the
    maximum grows, and divides by ``l`` once at the end: the ``T x S`` score matrix never exists.
    When ``traffic`` is a dict, the numbers read from and written to main memory per head (one leading
    index) are added to its keys ``"read"`` and ``"write"``.
    """
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            f"q, k, v must be (..., T, d) with equal ranks, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1] or k.shape[-2] != v.shape[-2] or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_q}, {block_k}")
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if causal and S != T:
        raise ValueError(f"causal attention needs as many keys as queries, got T = {T}, S = {S}")
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)  # (..., T, d_v)
    for i0 in range(0, T, block_q):
        qi = q[..., i0 : i0 + block_q, :]  # (..., Br, d): read once
        rows = qi.shape[-2]
        m = torch.full((*q.shape[:-2], rows, 1), -math.inf, dtype=q.dtype, device=q.device)  # running max
        row_sum = torch.zeros_like(m)  # running sum of exp(s - m)
        o = torch.zeros(*q.shape[:-2], rows, v.shape[-1], dtype=q.dtype, device=q.device)  # unnormalised output
        if traffic is not None:
            traffic["read"] = traffic.get("read", 0) + rows * d
        last_key = min(S, i0 + rows) if causal else S  # causal: keys after the block's last query are skipped
        for j0 in range(0, last_key, block_k):
            kj, vj = k[..., j0 : j0 + block_k, :], v[..., j0 : j0 + block_k, :]  # (..., Bc, d), (..., Bc, d_v)
            if traffic is not None:
                traffic["read"] += kj.shape[-2] * (d + v.shape[-1])
            s = (qi @ kj.transpose(-2, -1)) * scale  # (..., Br, Bc), on chip only
            if causal:
                qpos = torch.arange(i0, i0 + rows, device=q.device)[:, None]
                kpos = torch.arange(j0, j0 + kj.shape[-2], device=q.device)[None, :]
                s = s.masked_fill(kpos > qpos, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # finite: key 0 is always seen first
            p = torch.exp(s - m_new)  # (..., Br, Bc)
            rescale = torch.exp(m - m_new)  # shrinks the old sum and output to the new maximum
            row_sum = rescale * row_sum + p.sum(dim=-1, keepdim=True)
            o = rescale * o + p @ vj
            m = m_new
        out[..., i0 : i0 + rows, :] = o / row_sum
        if traffic is not None:
            traffic["write"] = traffic.get("write", 0) + rows * v.shape[-1]
    return out


def attention_hbm_traffic(T: int, d: int, M: int) -> dict[str, int]:
    """Numbers moved between HBM and on-chip memory by one head of attention, ``T`` tokens, head size ``d``.

    ``"standard"``: the three-kernel algorithm that writes ``S = QK^T`` and ``P = softmax(S)`` to HBM,
    ``4Td + 4T^2``. ``"flash"``: :func:`flash_attention` with the tiles of :func:`flash_tiles` for an on-chip
    memory of ``M`` numbers, ``2Td + 2Td * ceil(T / B_r)`` (``Q`` read and ``O`` written once, ``K`` and
    ``V`` read once per query block). ``"flops"``: ``4T^2 d``, the two matrix products, the same for both.
    """
    if min(T, d) < 1:
        raise ValueError(f"T and d must be >= 1, got {T}, {d}")
    b_r, _ = flash_tiles(d, M)
    return {
        "standard": 4 * T * d + 4 * T * T,
        "flash": 2 * T * d + 2 * T * d * math.ceil(T / b_r),
        "flops": 4 * T * T * d,
    }


# ---------------------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------------------


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e P_e`` for router ``probs (N, E)`` and choices ``(N, k)``.

    ``f_e`` is the fraction of the ``N k`` assignments that go to expert ``e`` (not differentiable) and
    ``P_e`` the mean router probability of ``e`` (differentiable). It equals 1 when both are uniform.
    """
    if probs.ndim != 2 or expert_index.ndim != 2 or expert_index.shape[0] != probs.shape[0]:
        raise ValueError(
            f"expected probs (N, E) and expert_index (N, k), got {tuple(probs.shape)}, {tuple(expert_index.shape)}"
        )
    n_experts = probs.shape[1]
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts).to(probs.dtype)  # (E,)
    f = counts / expert_index.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """A mixture-of-experts feed-forward layer: ``x (N, d) -> (y (N, d), aux loss)``.

    A linear router gives probabilities ``softmax(W_r x)`` over ``n_experts`` MLPs
    (``d -> hidden -> d``, GELU); each token goes to its ``k`` most probable experts, and their outputs
    are summed with the router's probabilities as weights (renormalised over the ``k`` chosen when
    ``k > 1``, as in GShard; with ``k = 1`` the weight is the probability itself, as in Switch, so the
    router learns from the task loss). Only the chosen experts run on a token. The last routing is kept
    in ``self.last_probs (N, E)`` and ``self.last_index (N, k)``.
    """

    def __init__(self, d: int, hidden: int, n_experts: int, k: int = 1) -> None:
        super().__init__()
        if min(d, hidden) < 1 or n_experts < 1 or not 1 <= k <= n_experts:
            raise ValueError(f"need d, hidden >= 1 and 1 <= k <= n_experts, got {d}, {hidden}, {n_experts}, k = {k}")
        self.d, self.k, self.n_experts = d, k, n_experts
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(n_experts)
        )
        self.last_probs: torch.Tensor | None = None
        self.last_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected x (N, {self.d}), got {tuple(x.shape)}")
        probs = torch.softmax(self.router(x), dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.k, dim=-1)  # (N, k), (N, k)
        if self.k > 1:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)  # the tokens routed to e, and in which slot
            if len(token):
                y = y.index_add(0, token, top_p[token, slot, None] * expert(x[token]))  # run e on its tokens only
        self.last_probs, self.last_index = probs.detach(), top_i.detach()
        return y, load_balancing_loss(probs, top_i)


def routing_specialisation(cluster: torch.Tensor, expert: torch.Tensor, n_clusters: int) -> float:
    """Normalised mutual information ``I(C; E) / H(C)`` between token clusters ``(N,)`` and routed experts ``(N,)``.

    1 when the expert determines the cluster (each cluster has experts of its own), 0 when routing is
    independent of the cluster. Clusters are ``0 .. n_clusters-1``; experts any non-negative integers.
    """
    if cluster.ndim != 1 or expert.shape != cluster.shape or len(cluster) == 0:
        raise ValueError(f"expected two non-empty (N,) tensors, got {tuple(cluster.shape)}, {tuple(expert.shape)}")
    if int(cluster.min()) < 0 or int(cluster.max()) >= n_clusters or int(expert.min()) < 0:
        raise ValueError(f"clusters must lie in 0 .. {n_clusters - 1} and experts be >= 0")
    n_experts = int(expert.max()) + 1
    joint = torch.zeros(n_clusters, n_experts, dtype=torch.float64)  # (C, E) counts
    joint.index_put_(
        (cluster.long().cpu(), expert.long().cpu()), torch.ones(len(cluster), dtype=torch.float64), accumulate=True
    )
    joint /= joint.sum()
    p_c, p_e = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)  # (C, 1), (1, E)
    nz = joint > 0
    mutual = (joint[nz] * (joint[nz] / (p_c * p_e)[nz]).log()).sum()
    h_c = -(p_c[p_c > 0] * p_c[p_c > 0].log()).sum()
    return float(mutual / h_c) if h_c > 0 else 0.0


def moe_cost(d: int, hidden: int, n_experts: int, k: int) -> dict[str, int]:
    """Parameters of :class:`MoE` and forward FLOPs per token (2 per multiply-add, matrix products only).

    ``"params"``: router ``dE`` plus ``E`` experts of ``2dh + h + d``; ``"active_params"``: the router and
    ``k`` experts; ``"flops_per_token"``: ``2dE + 4kdh``; ``"dense_flops_per_token"``: the same layer if
    every expert ran on every token, ``2dE + 4Edh``.
    """
    if min(d, hidden, n_experts) < 1 or not 1 <= k <= n_experts:
        raise ValueError(f"need d, hidden, n_experts >= 1 and 1 <= k <= n_experts, got {d}, {hidden}, {n_experts}, {k}")
    expert = 2 * d * hidden + hidden + d
    return {
        "params": d * n_experts + n_experts * expert,
        "active_params": d * n_experts + k * expert,
        "flops_per_token": 2 * d * n_experts + 4 * k * d * hidden,
        "dense_flops_per_token": 2 * d * n_experts + 4 * n_experts * d * hidden,
    }


# ---------------------------------------------------------------------------------------------------------------
# State-space models
# ---------------------------------------------------------------------------------------------------------------


def ssm_discretize(a: torch.Tensor, b: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order-hold discretisation of ``x' = a x + b u`` per state.

    ``abar = exp(dt a)`` and ``bbar = (abar - 1) / a * b``.

    ``a (H, N)`` (negative: a stable diagonal state matrix), ``b (H, N)``, ``dt (H,)`` -> ``abar, bbar (H, N)``.
    """
    if a.ndim != 2 or b.shape != a.shape or dt.shape != a.shape[:1]:
        raise ValueError(f"expected a, b (H, N) and dt (H,), got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(dt.shape)}")
    if not bool((a < 0).all()) or not bool((dt > 0).all()):
        raise ValueError("need a < 0 (a stable system) and dt > 0")
    abar = torch.exp(dt[:, None] * a)
    return abar, (abar - 1) / a * b


def ssm_recurrence(abar: torch.Tensor, bbar: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x_t = abar * x_{t-1} + bbar u_t``, ``y_t = sum_n c_n x_{t,n}`` from ``x_{-1} = 0``, one channel at a time.

    ``abar, bbar, c (H, N)``, ``u (B, H, T)`` -> ``y (B, H, T)``: ``T`` sequential steps of ``O(N)`` work each.
    """
    if u.ndim != 3 or u.shape[1] != abar.shape[0] or bbar.shape != abar.shape or c.shape != abar.shape:
        raise ValueError(f"expected abar, bbar, c (H, N) and u (B, H, T), got {tuple(abar.shape)}, {tuple(u.shape)}")
    x = torch.zeros(u.shape[0], *abar.shape, dtype=u.dtype, device=u.device)  # (B, H, N)
    ys = []
    for t in range(u.shape[2]):
        x = abar * x + bbar * u[:, :, t, None]
        ys.append((x * c).sum(-1))  # (B, H)
    return torch.stack(ys, dim=-1)


def ssm_kernel(abar: torch.Tensor, bbar: torch.Tensor, c: torch.Tensor, T: int) -> torch.Tensor:
    """The convolution kernel ``K_j = sum_n c_n abar_n^j bbar_n`` for ``j = 0 .. T-1``: ``(H, N) -> (H, T)``."""
    if T < 1 or bbar.shape != abar.shape or c.shape != abar.shape:
        raise ValueError(f"need T >= 1 and abar, bbar, c of one shape (H, N), got T = {T}, {tuple(abar.shape)}")
    powers = abar[..., None] ** torch.arange(T, device=abar.device, dtype=abar.dtype)  # (H, N, T)
    return torch.einsum("hn,hnt->ht", c * bbar, powers)


def causal_conv_fft(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``y_t = sum_{j <= t} K_j u_{t-j}`` for ``kernel (H, T)`` and ``u (B, H, T)``, by FFT of length ``2T``."""
    if u.ndim != 3 or kernel.shape != u.shape[1:]:
        raise ValueError(f"expected kernel (H, T) and u (B, H, T), got {tuple(kernel.shape)}, {tuple(u.shape)}")
    T = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * T) * torch.fft.rfft(kernel, n=2 * T), n=2 * T)  # zero-padded: no wrap
    return y[..., :T]


def ssm_flops(T: int, N: int) -> dict[str, float]:
    """FLOPs per channel of a length-``T`` sequence through a diagonal SSM with ``N`` states.

    ``"recurrence"``: ``5TN`` (3 for the state update, 2 for the read-out), in ``T`` sequential steps.
    ``"kernel"``: ``3TN`` to build the kernel once (a power and a multiply-add per entry).
    ``"conv_direct"``: ``T(T+1)``, the multiply-adds of a causal convolution. ``"conv_fft"``: three real
    FFTs of length ``2T`` at the usual ``2.5 n log2 n`` each and ``6(T+1)`` for the complex products.
    """
    if min(T, N) < 1:
        raise ValueError(f"T and N must be >= 1, got {T}, {N}")
    n = 2 * T
    return {
        "recurrence": 5.0 * T * N,
        "kernel": 3.0 * T * N,
        "conv_direct": float(T * (T + 1)),
        "conv_fft": 3 * 2.5 * n * math.log2(n) + 6.0 * (T + 1),
    }


def selective_scan(
    u: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """A selective (Mamba-style) SSM: the step ``delta``, ``b`` and ``c`` depend on the input, so only a scan works.

    ``u, delta (B, T, H)``, ``a (H, N)`` (negative), ``b, c (B, T, N)`` -> ``y (B, T, H)`` with
    ``x_t = exp(delta_t a) * x_{t-1} + delta_t b_t u_t`` (Mamba's discretisation of ``b``) and
    ``y_t = x_t c_t``. A large ``delta_t`` lets the state forget and take in ``u_t``; a small one skips it.
    """
    if u.ndim != 3 or delta.shape != u.shape or a.ndim != 2 or a.shape[0] != u.shape[2]:
        raise ValueError(
            f"expected u, delta (B, T, H) and a (H, N), got {tuple(u.shape)}, {tuple(delta.shape)}, {tuple(a.shape)}"
        )
    if b.shape != (*u.shape[:2], a.shape[1]) or c.shape != b.shape:
        raise ValueError(f"expected b, c of shape {(*u.shape[:2], a.shape[1])}, got {tuple(b.shape)}, {tuple(c.shape)}")
    x = torch.zeros(u.shape[0], *a.shape, dtype=u.dtype, device=u.device)  # (B, H, N)
    ys = []
    for t in range(u.shape[1]):
        dt = delta[:, t, :, None]  # (B, H, 1)
        x = torch.exp(dt * a) * x + dt * b[:, t, None, :] * u[:, t, :, None]  # (B, H, N)
        ys.append(torch.einsum("bhn,bn->bh", x, c[:, t]))
    return torch.stack(ys, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion: DDIM
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_sample(
    model: nn.Module, n: int, schedule: NoiseSchedule, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """Deterministic DDIM sampling (``eta = 0``) in ``steps`` model calls from an epsilon-predicting ``model``.

    The times ``tau_1 > ... > tau_S`` are spread evenly over ``T-1 .. 0``; each step predicts
    ``x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` and moves to
    ``sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps`` at the next time ``s`` (``abar = 1`` after the last).
    ``model(x (n, d), t (n,))`` needs a ``dim`` attribute; returns ``(n, d)`` float32 on the CPU.
    """
    if n < 1 or not 1 <= steps <= schedule.T:
        raise ValueError(f"need n >= 1 and 1 <= steps <= T = {schedule.T}, got n = {n}, steps = {steps}")
    dim = getattr(model, "dim", None)
    if not isinstance(dim, int):
        raise ValueError("the model needs an integer attribute dim, the size of a data point")
    device = model_device(model)
    abars = schedule.alpha_bars
    times = torch.linspace(schedule.T - 1, 0, steps).round().long().tolist()
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)  # (n, d) on the CPU
    for i, t in enumerate(times):
        tt = torch.full((n,), t, dtype=torch.long, device=device)
        eps = model(x.float().to(device), tt).double().cpu()  # (n, d)
        x0_hat = (x - (1 - abars[t]).sqrt() * eps) / abars[t].sqrt()
        abar_next = abars[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, dtype=torch.float64)
        x = abar_next.sqrt() * x0_hat + (1 - abar_next).sqrt() * eps
    return x.float()


# ---------------------------------------------------------------------------------------------------------------
# Instruction tuning and preference optimisation
# ---------------------------------------------------------------------------------------------------------------


def sft_labels(tokens: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """Next-token targets for supervised fine-tuning, masked on the prompt.

    ``tokens (B, L)``, ``prompt_len (B,)`` -> ``labels (B, L-1)``: ``labels[b, i] = tokens[b, i+1]`` when
    position ``i+1`` is in the response (``i + 1 >= prompt_len[b]``), else :data:`IGNORE`.
    """
    if tokens.ndim != 2 or prompt_len.shape != tokens.shape[:1]:
        raise ValueError(
            f"expected tokens (B, L) and prompt_len (B,), got {tuple(tokens.shape)}, {tuple(prompt_len.shape)}"
        )
    if bool((prompt_len < 1).any()) or bool((prompt_len >= tokens.shape[1]).any()):
        raise ValueError(f"every prompt needs 1 <= prompt_len < L = {tokens.shape[1]} (a non-empty response)")
    targets = tokens[:, 1:]  # (B, L-1)
    position = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :]  # (1, L-1): the target's position
    return targets.masked_fill(position < prompt_len[:, None], IGNORE)


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the response tokens only.

    ``logits (B, L, V)`` predict the next token of ``tokens (B, L)``; ``prompt_len (B,)`` as in :func:`sft_labels`.
    """
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"expected logits (B, L, V) matching tokens (B, L), got {tuple(logits.shape)}, {tuple(tokens.shape)}"
        )
    labels = sft_labels(tokens, prompt_len)  # (B, L-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def dpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DPO loss ``-log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])``.

    All four inputs are sequence log-probabilities of shape ``(B,)``. Returns the mean loss and the
    implicit reward margins ``(B,)`` (the bracket times ``beta``).
    """
    shapes = {tuple(t.shape) for t in (logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected)}
    if len(shapes) != 1 or logp_chosen.ndim != 1:
        raise ValueError(f"the four log-probabilities must share one shape (B,), got {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = beta * ((logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected))  # (B,)
    return -F.logsigmoid(margin).mean(), margin


def bradley_terry_prefs(
    reward: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` synthetic comparisons under the Bradley-Terry model for a reward table ``(P, K)``.

    Draws a prompt and two different responses uniformly, and prefers the first with probability
    ``sigmoid(r_1 - r_2)``. Returns ``(prompt, chosen, rejected)``, each ``(n,)`` long.
    """
    if reward.ndim != 2 or reward.shape[1] < 2 or n < 1:
        raise ValueError(f"need a reward table (P, K >= 2) and n >= 1, got {tuple(reward.shape)}, n = {n}")
    P, K = reward.shape
    prompt = torch.randint(0, P, (n,), generator=generator)
    y1 = torch.randint(0, K, (n,), generator=generator)
    y2 = (y1 + torch.randint(1, K, (n,), generator=generator)) % K  # different from y1
    first = torch.rand(n, generator=generator, dtype=reward.dtype) < torch.sigmoid(
        reward[prompt, y1] - reward[prompt, y2]
    )
    return prompt, torch.where(first, y1, y2), torch.where(first, y2, y1)
